"""Issue 23's answer in one figure and one table: forwards per token against the judge's NLL, per trained variant and
block length, with each group's Pareto front and the issue's quality bar.

Reads the sweep report's ``samples.csv`` (``blockdiff sweep --report runs/ablation/native``). A point *passes* when
its judge NLL is within 10 % of the same model's threshold tau = 0.9 sampling and its unigram entropy and distinct
bigrams are not more than 10 % below that reference's (repetition lowers judge NLL: a method that wins by repeating
itself has not won). The table gives, per model, the fewest forwards per token of a passing point; the figure marks
passing points filled and failing ones hollow, and draws the Pareto front (fewest forwards for a given NLL) of all.

    python experiments/native/pareto.py runs/ablation/native/samples.csv docs/ablations/issue23
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

SLACK = 0.10


def read(path: Path) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            for key in ("nfe_per_token", "gen_nll", "entropy", "distinct_2"):
                row[key] = float(row[key])
            groups[(_label(row["run"]), int(row["block_length"]))].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def _label(run: str) -> str:
    if "source-distilled" in run:
        floor = ", mask-floor curriculum" if "mask_floor" in run else ""
        return "distilled" + (", certainty 0.5" if "weight-0.5" in run else "") + floor
    if "self_conditioning-True" in run:
        return "self-conditioning"
    return "certainty 0.5" if run.endswith("weight-0.5") else "plain"


def passes(row: dict, ref: dict) -> bool:
    return (row["gen_nll"] <= (1 + SLACK) * ref["gen_nll"] and row["entropy"] >= (1 - SLACK) * ref["entropy"]
            and row["distinct_2"] >= (1 - SLACK) * ref["distinct_2"])


def reference(rows: list[dict]) -> dict:
    return next(r for r in rows if r["sampler"] == "threshold tau=0.9")


def front(rows: list[dict]) -> list[dict]:
    """Points no other point beats on both forwards per token and judge NLL, by forwards per token."""
    pts = sorted(rows, key=lambda r: (r["nfe_per_token"], r["gen_nll"]))
    out, best = [], float("inf")
    for r in pts:
        if r["gen_nll"] < best:
            out.append(r)
            best = r["gen_nll"]
    return out


def table(groups) -> str:
    lines = ["| model | L' | threshold 0.9: forwards/token, judge NLL, entropy, distinct-2 | fewest forwards/token "
             "that passes (sampler) | its judge NLL, entropy, distinct-2 |", "|---|---|---|---|---|"]
    for (label, l), rows in groups.items():
        ref = reference(rows)
        ok = sorted((r for r in rows if passes(r, ref)), key=lambda r: (r["nfe_per_token"], r["gen_nll"]))
        best = ok[0]
        lines.append(f"| {label} | {l} | {ref['nfe_per_token']:.3f}, {ref['gen_nll']:.3f}, {ref['entropy']:.2f}, "
                     f"{ref['distinct_2']:.3f} | **{best['nfe_per_token']:.3f}** ({best['sampler']}) | "
                     f"{best['gen_nll']:.3f}, {best['entropy']:.2f}, {best['distinct_2']:.3f} |")
    return "\n".join(lines)


def plot(groups, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({l for _, l in groups})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), sharey=True)
    for ax, l in zip(axes if len(lengths) > 1 else [axes], lengths):
        for i, ((label, gl), rows) in enumerate((k, v) for k, v in groups.items() if k[1] == l):
            color = f"C{i}"
            ref = reference(rows)
            for r in rows:
                ok = passes(r, ref)
                ax.scatter(r["nfe_per_token"], r["gen_nll"], s=22, color=color if ok else "none", edgecolors=color)
            f = front(rows)
            ax.plot([r["nfe_per_token"] for r in f], [r["gen_nll"] for r in f], color=color, label=label)
            ax.scatter([ref["nfe_per_token"]], [ref["gen_nll"]], marker="*", s=120, color=color)
        ax.axvline(0.5 if l <= 4 else 0.35, color="grey", linestyle=":", label="target forwards/token")
        ax.set_title(f"L' = {l} (filled: passes the 10 % bar; star: threshold 0.9)", fontsize=10)
        ax.set_xlabel("forwards per token")
        ax.set_ylabel("judge NLL (nats/token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    return path


def main(samples: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = read(Path(samples))
    text = table(groups)
    (out / "pareto.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'pareto.md'} and {plot(groups, out)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
