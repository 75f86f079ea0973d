"""Benchmark: peak memory and step time of a block-diffusion training step with and without activation checkpointing.

Each (sequence length, checkpointing) variant runs in its OWN child process (peak RSS, ``ru_maxrss``, only grows, so
variants cannot share a process): build the model (``build_model`` from a config, so ``model.gradient_checkpointing``
is the key being measured), record the resident memory after building (``before``), run ``--steps`` full training
steps (``zero_grad`` + ``block_diffusion_loss`` over ``x_t ⊕ x_0`` under the dense training mask + backward + AdamW,
fp32), then report peak RSS, the peak's growth over ``before`` (what the step itself needed) and the mean step time
of the steps after the first (``_timing.timed``). The variants are not interleaved (one process each), so the step
time ratio is only indicative on a shared machine; memory does not depend on load.

Model: the demo network (llama, hidden 192, 4 layers, 4 heads; byte vocabulary, 262 tokens), block length 4,
batch ``--batch``. Writes ``results.json`` and ``table.md`` into ``--out``::

    python experiments/bench_checkpointing.py --lengths 256 1024 --batch 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import _timing  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
from _report import print_report, results_dir, write_report


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(length: int, checkpointing: bool, batch: int, steps: int) -> dict:
    """One variant: build, step ``steps`` times, return the numbers (runs in its own process)."""
    import torch

    from blockdiff.config import load_config
    from blockdiff.core.loss import block_diffusion_loss
    from blockdiff.core.noise import make_schedule
    from blockdiff.training.builders import build_model

    cfg = load_config([], ["data.tokenizer=bytes", f"data.max_seq_len={length}", "model.block_length=4",
                           f"model.gradient_checkpointing={checkpointing}"])
    torch.manual_seed(0)
    _, model = build_model(cfg, docs={"text": []})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, 250, (batch, length))
    schedule = make_schedule("loglinear")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = block_diffusion_loss(model, x0, schedule, (1e-3, 1.0)).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    before = _rss_mib()
    step()  # the first step also allocates AdamW's state
    seconds = _timing.timed(step, max(1, steps - 1)).seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(length=length, checkpointing=checkpointing, batch=batch, before_mib=before, peak_mib=peak,
                step_mib=peak - before, step_seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=results_dir(__file__))
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1] == "1", args.batch, args.steps)))
        return
    runs = []
    for length in args.lengths:
        for checkpointing in (False, True):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(length), str(int(checkpointing)),
                 "--batch", str(args.batch), "--steps", str(args.steps)],
                capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    env = _timing.environment()
    rows = []
    for r in runs:
        plain = next(p for p in runs if p["length"] == r["length"] and not p["checkpointing"])
        rows.append([str(r["length"]), "on" if r["checkpointing"] else "off", f"{r['peak_mib']:.0f}",
                     f"{r['step_mib']:.0f}", f"{r['step_mib'] / plain['step_mib']:.2f}", f"{r['step_seconds']:.2f}",
                     f"{r['step_seconds'] / plain['step_seconds']:.2f}"])
    columns = ["L", "checkpointing", "peak RSS MiB", "step's growth MiB", "growth vs off", "step s", "time vs off"]
    comment = (_timing.header(env) + f"\ndemo network (llama, hidden 192, 4 layers), bytes, block length 4, "
               f"batch {args.batch}, fp32; one process per variant")
    write_report(args.out, {"environment": env, "settings": vars(args) | {"out": str(args.out)}, "runs": runs},
                 comment, columns, rows)
    from rich.console import Console

    print_report(Console(), "activation checkpointing", columns, rows, _timing.header(env), f"wrote {args.out}", "L")


if __name__ == "__main__":
    main()
