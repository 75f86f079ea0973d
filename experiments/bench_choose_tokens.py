"""Token choice alone, before vs after: an older tree's ``choose_tokens`` against ``choose_rows``, interleaved.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_choose_tokens.py /tmp/before

SmolLM2's vocabulary (49153), 16 rows (batch 1, L'=16) and 128 rows (batch 8, L'=16) of peaked logits; greedy,
temperature 0.8, with top-k 50, with top-p 0.9. Seven interleaved timings each; medians and the median of the
per-pair ratios.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockdiff.sampling.logits import choose_rows  # noqa: E402


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a source tree whose blockdiff/sampling/logits.py is the old one")
    args = parser.parse_args()
    torch.set_num_threads(2)
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
            before, after = [], []
            for _ in range(7):
                before.append(once(lambda: old.choose_tokens(logits, generator=g, **kw)))
                after.append(once(lambda: choose_rows(logits, u, need_probs=False, **kw)))
            ratio = statistics.median([a / b for a, b in zip(before, after)])
            print(f"| {rows} | {name} | {statistics.median(before) * 1e3:.1f} | {statistics.median(after) * 1e3:.1f} "
                  f"| {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
