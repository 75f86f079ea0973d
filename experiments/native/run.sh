#!/usr/bin/env bash
# Issue 23, item 4: the native-decoding ablation (docs/ablations.md). The judge / AR parent first, then the from-AR
# block diffusers and their sampling grid, then the report (forwards per token vs judge NLL, Pareto plot).
# One CPU thread per run; re-running resumes (finished runs are skipped, new sample settings sampled on them).
#   bash experiments/native/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m blockdiff.cli sweep experiments/native/judge.yaml
"$PY" -m blockdiff.cli sweep experiments/native/native.yaml --parallel "${PARALLEL:-1}"
"$PY" -m blockdiff.cli sweep --report runs/ablation/native
mkdir -p docs/ablations/issue23
cp runs/ablation/native/{results.md,results.csv,evals.csv,samples.csv,*.png} docs/ablations/issue23/
