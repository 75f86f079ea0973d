"""The BD3-LM block-length hypothesis, checked on a sweep report: AR <= L'=4 <= L'=8 <= L'=16 <= MDLM in PPL.

A hypothesis about one experiment, so it lives with that experiment, not in the library:
``blockdiff.sweeps.report.report(root, checks=[ordering_check])`` writes its line into ``results.md``.
Run it on a finished ablation (what ``run.sh`` does last)::

    python experiments/block_length/ordering.py runs/ablation

The bound being checked is the NELBO perplexity of docs/design.md §2.
"""

from __future__ import annotations

import sys

from rich.console import Console

from blockdiff.sweeps.report import format_mean_sd, group_rows, mean_sd, report

__all__ = ["ordering_check", "main"]


def ordering_check(results: list[dict]) -> str:
    """Does AR <= L'=4 <= L'=8 <= L'=16 <= MDLM hold for the mean PPL of the log-linear runs?"""
    plain = [r for r in results if r["variant"].endswith("U[0,1]") and not r["variant"].startswith("mixture")]
    by_l = {l: mean_sd([r["ppl"] for r in rows]) for (l,), rows in group_rows(plain, ("block_length",)).items()}
    if not by_l:
        return "ordering check: no log-linear runs"
    mdlm = max(r["max_seq_len"] for r in plain)
    chain = [l for l in (1, 4, 8, 16, mdlm) if l in by_l]
    holds = all(by_l[a][0] <= by_l[b][0] for a, b in zip(chain, chain[1:]))
    text = " ≤ ".join(f"L'={l}: {format_mean_sd(*by_l[l], 2)}" for l in chain)
    pairs = []  # each adjacent pair, compared seed by seed (same seed = same data order)
    for a, b in zip(chain, chain[1:]):
        ppl = {l: {r["seed"]: r["ppl"] for r in plain if r["block_length"] == l} for l in (a, b)}
        seeds = sorted(set(ppl[a]) & set(ppl[b]))
        pairs.append(f"L'={a} < L'={b} in {sum(ppl[a][s] < ppl[b][s] for s in seeds)}/{len(seeds)} seeds")
    return (f"BD3-LM ordering (mean PPL ± sd, log-linear) {'HOLDS' if holds else 'does NOT hold'}: {text}; "
            + ", ".join(pairs))


def main(argv: list[str] | None = None) -> int:
    """``ordering.py DIR``: the sweep report of ``DIR`` (as ``blockdiff sweep --report DIR``) with the check."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python experiments/block_length/ordering.py SWEEP_OUT_DIR", file=sys.stderr)
        return 2
    for path in report(args[0], Console(soft_wrap=True), checks=[ordering_check]):  # as `blockdiff sweep --report`
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
