"""Token choice alone, before vs after: an older tree's ``choose_tokens`` against ``choose_rows``, interleaved.

    python experiments/bench_choose_tokens.py /tmp/before

SmolLM2's vocabulary (49153), 16 rows (batch 1, L'=16) and 128 rows (batch 8, L'=16) of peaked logits; greedy,
temperature 0.8, with top-k 50, with top-p 0.9. ``--rounds`` (7) interleaved rounds each (``_timing.py``); medians
and the median of the same-round ratios. ``OMP_WAIT_POLICY=PASSIVE`` unless given (``_timing.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _timing import rotations, same_round_ratio, timed

from blockdiff.sampling.logits import choose_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a source tree whose blockdiff/sampling/logits.py is the old one")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(_timing.header(_timing.environment()), flush=True)
    spec = importlib.util.spec_from_file_location("old_logits", Path(args.before) / "blockdiff/sampling/logits.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    for rows in (16, 128):
        logits = torch.randn(rows, 49153, generator=torch.Generator().manual_seed(0)) * 3
        logits[:, :30] += 12  # most of the mass on a few tokens, as a trained LM's
        g, u = torch.Generator().manual_seed(0), torch.rand(rows)
        for name, kw in [("greedy", dict(temperature=0.0)), ("T=0.8", dict(temperature=0.8)),
                         ("T=0.8 top-k 50", dict(temperature=0.8, top_k=50)),
                         ("T=0.8 top-p 0.9", dict(temperature=0.8, top_p=0.9))]:
            calls = {"before": lambda: old.choose_tokens(logits, generator=g, **kw),
                     "after": lambda: choose_rows(logits, u, need_probs=False, **kw)}
            times = {name: [] for name in calls}
            for _, order in rotations(list(calls), args.rounds):
                for name in order:
                    times[name].append(timed(calls[name]).seconds)
            before, after = times["before"], times["after"]
            ratio = same_round_ratio(before, after)
            print(f"| {rows} | {name} | {statistics.median(before) * 1e3:.1f} | {statistics.median(after) * 1e3:.1f} "
                  f"| {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
