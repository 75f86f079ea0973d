#!/usr/bin/env bash
# The block-length ablation of docs/ablations.md, on one CPU thread (about an hour on a 2-core CPU).
# Re-running resumes: finished runs (those with summary.json) are skipped.
#   bash experiments/block_length/run.sh            # ends with the report (+ the ordering check)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-.venv/bin/python}
for sweep in block_length schedules mixture; do   # block_length first: its AR run scores the others' samples
  "$PY" -m blockdiff.cli sweep "experiments/block_length/$sweep.yaml" --parallel "${PARALLEL:-1}"
done
"$PY" experiments/block_length/ordering.py runs/ablation   # the report, with the BD3-LM ordering check
