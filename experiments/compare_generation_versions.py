"""Does a change slow generation down? Time the same generation under two source trees, round-robin.

    git worktree add /tmp/before <commit>
    python experiments/compare_generation_versions.py /tmp/before . --rounds 6

Each round runs one subprocess per tree (``PYTHONPATH=<tree>``; which tree goes first rotates every round): a random
demo-sized model (hidden 192, 4 layers, vocab 2048, block length 4), 256 new tokens with the threshold sampler (tau
0.9, temperature 0.8, seeded), one warm-up call first, then one call timed with this tree's ``_timing.timed``.
Prints the per-round ratio (after / before) and its median (``_timing.same_round_ratio``); writes ``results.json``
and ``table.md`` into ``--out``. OMP_WAIT_POLICY=PASSIVE is set for the children (libgomp's spin-waiting makes
shared-machine timings erratic).

``--model-dir DIR`` times a saved model instead (``BlockDiffusionLM.from_pretrained`` in each tree, e.g. SmolLM2
with a mask token written by ``save_pretrained``); ``--block-length``, ``--batch`` (that many copies of the
prompt), ``--new-tokens`` and ``--temperature`` change the generation (defaults: the model's block length, 1,
256, 0.8).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import _timing
from _report import results_dir, write_report
from _timing import rotations, same_round_ratio, same_round_ratios

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[6])  # this checkout's experiments/: _timing, whatever the tree under test
from _timing import timed
import torch
torch.set_num_threads(2)
from blockdiff import BlockDiffusionLM, BlockDiffusionSpec, build_backbone  # the same import in older trees
model_dir, block_length, batch, new_tokens, temperature = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
torch.manual_seed(0)
if model_dir:
    model = BlockDiffusionLM.from_pretrained(model_dir).eval()
else:
    from blockdiff.config import ModelConfig
    cfg = ModelConfig(hidden_size=192, num_layers=4, num_heads=4, block_length=4)
    backbone = build_backbone(cfg, vocab_size=2048, max_seq_len=512).eval()
    model = BlockDiffusionLM(backbone, BlockDiffusionSpec(2047, 4, False, 512))
if block_length:
    model = model.with_block_length(block_length)
ids = [[1, 5, 9, 13] + list(range(20, 20 + i)) for i in range(batch)]
model.generate(ids, max_new_tokens=min(32, new_tokens), sampler="threshold", temperature=0.0, eos_token_id=None)
call = timed(lambda: model.generate(ids, max_new_tokens=new_tokens, sampler="threshold", tau=0.9,
                                    temperature=temperature, eos_token_id=None, seed=0))
print(call.seconds, call.result.nfe)
"""


def seconds(tree: str, settings: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", CHILD, *settings, here], env=env, capture_output=True, text=True,
                         check=True, cwd="/")
    return float(out.stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--block-length", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    settings = [os.path.abspath(args.model_dir) if args.model_dir else "", str(args.block_length), str(args.batch),
                str(args.new_tokens), str(args.temperature)]
    times = {"before": [], "after": []}
    for r, order in rotations(list(times), args.rounds):
        for name in order:
            times[name].append(seconds(getattr(args, name), settings))
        print(f"round {r}: before {times['before'][-1]:.2f} s, after {times['after'][-1]:.2f} s, "
              f"ratio {times['after'][-1] / times['before'][-1]:.3f}", flush=True)
    median = same_round_ratio(times["after"], times["before"])
    print(f"median after/before: {median:.3f} over {args.rounds} rounds")
    env = _timing.environment()
    ratios = same_round_ratios(times["after"], times["before"])
    rows = [[str(r), f"{b:.2f}", f"{a:.2f}", f"{x:.3f}"]
            for r, (b, a, x) in enumerate(zip(times["before"], times["after"], ratios))]
    comment = (f"{_timing.header(env)}\nbefore {args.before}, after {args.after}; median after/before "
               f"{median:.3f} over {args.rounds} rounds (same-round ratios)")
    write_report(args.out, dict(environment=env, before=args.before, after=args.after, settings=settings,
                                times_s=times, ratio_median=median), comment, ["round", "before s", "after s",
                                                                              "after/before"], rows)


if __name__ == "__main__":
    main()
