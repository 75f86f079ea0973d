#!/usr/bin/env bash
# The GPU check in one command (experiments/gpu/check.py says what it measures): bf16 training throughput and MFU,
# flex attention == SDPA, speculative decoding vs HF generate(), 2-GPU DDP/FSDP when there are 2 GPUs.
# Usage, from anywhere:  experiments/gpu/check.sh [--steps 10] [--out DIR]     (PY=... picks the interpreter)
# Results: experiments/results/gpu_check/{results.json,table.md}. Without CUDA: one line, exit status 2.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "${PY:-python}" experiments/gpu/check.py "$@"
