#!/usr/bin/env bash
# Issue 23, item 4: the native-decoding ablation (docs/ablations.md). The judge / AR parent first; then the judge
# written out as a plain decoder continues training-split prompts (the distilled set of dParallel's recipe); then the
# from-AR block diffusers and their sampling grid; then the report (forwards per token vs judge NLL, Pareto plot).
# Every step resumes: finished runs are skipped, a finished distilled set is kept, new sample settings are sampled on
# finished runs.
#   bash experiments/native/run.sh              # PARALLEL=2 trains two runs at a time, one thread each
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-.venv/bin/python}
ROOT=runs/ablation/native
"$PY" -m blockdiff.cli sweep experiments/native/judge.yaml
"$PY" - <<'PYTHON'
from pathlib import Path
from blockdiff.modeling.io import load_model_dir
out = Path("runs/ablation/native_teacher")
if not (out / "config.json").is_file():  # the judge as a plain Hugging Face decoder: the distillation teacher
    judge = load_model_dir("runs/ablation/native/block_length-1_logit_shift-True_beta-1_omega-1/model", lean=False)
    judge.model.backbone.save_pretrained(out)
    judge.tokenizer.save_pretrained(out)
PYTHON
"$PY" -m blockdiff.cli distill --teacher runs/ablation/native_teacher --out runs/ablation/native_distilled \
  --num-prompts 768 --prompt-tokens 16 --new-tokens 112 --temperature 1.0 --batch-size 32 --shard-size 128 \
  data.source=shakespeare data.max_seq_len=128
"$PY" -m blockdiff.cli sweep experiments/native/native.yaml --parallel "${PARALLEL:-1}"
"$PY" -m blockdiff.cli sweep --report "$ROOT"
mkdir -p docs/ablations/issue23
cp "$ROOT"/{results.md,results.csv,evals.csv,samples.csv,*.png} docs/ablations/issue23/
"$PY" experiments/native/pareto.py "$ROOT/samples.csv" docs/ablations/issue23
