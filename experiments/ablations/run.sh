#!/usr/bin/env bash
# The three ablations of issue 14 (docs/ablations.md: context x block length, absorbing vs uniform noise, block beam
# search), one CPU thread per run. Re-running resumes: finished runs (summary.json) are skipped, and sampling
# settings added to a sweep file later are sampled on the finished models without training them again.
#   bash experiments/ablations/run.sh            # then the reports, copied to docs/ablations/issue14/
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m blockdiff.cli sweep experiments/ablations/context_block.yaml --parallel "${PARALLEL:-1}"
"$PY" -m blockdiff.cli sweep experiments/ablations/noise_kind.yaml --parallel "${PARALLEL:-1}"
"$PY" -m blockdiff.cli sweep experiments/ablations/block_beams.yaml   # samples the noise_kind models only
for sweep in context_block noise_kind; do
  "$PY" -m blockdiff.cli sweep --report "runs/ablation/$sweep"
  mkdir -p "docs/ablations/issue14/$sweep"
  cp runs/ablation/$sweep/{results.md,results.csv,evals.csv,samples.csv,*.png} "docs/ablations/issue14/$sweep/"
done
