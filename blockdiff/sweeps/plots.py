"""Sweep plots (matplotlib, the optional ``plots`` extra): one function per figure, tidy rows in, PNG out.

* ``ppl_vs_block_length`` — held-out PPL bound vs trained block length (log2 axis), mean ± sd over seeds,
  one line per variant, AR (L'=1) and MDLM (L'=max_seq_len) ends marked; mixture models as PPL vs the
  *inference* block length;
* ``quality_vs_nfe`` — generative quality (AR NLL of the samples under the reference run) vs network
  forwards per generated token, one colour per sampler, each sampler's Pareto front drawn as a line;
* ``loss_curves`` — logged ``train/loss`` per run, smoothed (colour = block length);
* ``clip_variance`` — variance of the per-block NELBO estimate vs clipping window, one line per L'.

The rows are those of ``sweep_report`` (dicts); nothing here reads files except ``logs/metrics.csv``. The helpers
every figure shares (saving, reading ``metrics.csv``, smoothing) live in ``blockdiff/viewer/plots.py``, which also
draws ``blockdiff plot``'s figures.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from blockdiff.viewer.plots import moving_average, plt, read_metrics
from blockdiff.viewer.plots import save as _save

__all__ = ["ppl_vs_block_length", "quality_vs_nfe", "loss_curves", "clip_variance"]


def _mean_sd(values):
    values = [v for v in values if v is not None]
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def ppl_vs_block_length(results: list[dict], evals: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = defaultdict(lambda: defaultdict(list))
    for r in results:
        if not r["variant"].startswith("mixture"):
            lines[r["variant"]][r["block_length"]].append(r["ppl"])
    for e in evals:
        if e["variant"].startswith("mixture"):
            lines[e["variant"] + " (at inference L')"][e["eval_block_length"]].append(e["ppl"])
    for name, by_l in sorted(lines.items()):
        xs = sorted(by_l)
        stats = [_mean_sd(by_l[x]) for x in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block length L'")
    ax.set_ylabel("held-out PPL bound (exp NELBO)")
    mdlm = max((r["max_seq_len"] for r in results), default=None)
    for x, label in ((1, "AR"), (mdlm, "MDLM")):
        if x is not None:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def quality_vs_nfe(samples: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = defaultdict(list)  # (sampler, tau, variant, L'train, L'sample) -> [(nfe, nll)]
    for s in samples:
        if s["gen_nll"] is not None:
            key = (s["sampler"], s["variant"], s["block_length"], s["sample_block_length"])
            points[key].append((s.get("row_forwards_per_token", s["nfe_per_token"]), s["gen_nll"]))
    by_sampler = defaultdict(list)
    for (sampler, var, l, sl), pts in points.items():
        nfe, _ = _mean_sd([p[0] for p in pts])
        nll, _ = _mean_sd([p[1] for p in pts])
        by_sampler[sampler].append((nfe, nll, sl))
    for name, pts in sorted(by_sampler.items()):
        pts.sort()
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name, s=25)
        front, best = [], float("inf")
        for nfe, nll, _ in pts:  # Pareto front: fewer forwards and lower NLL
            if nll < best:
                front.append((nfe, nll))
                best = nll
        ax.plot([p[0] for p in front], [p[1] for p in front], color=sc.get_facecolor()[0], linewidth=1)
        for nfe, nll, sl in pts:
            ax.annotate(f"{sl}", (nfe, nll), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("row forwards per generated token (NFE/token; beam search counts every candidate row)")
    ax.set_ylabel("sample NLL under the AR reference (nats/token)")
    ax.set_title("quality vs NFE (labels: sampling block length)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_curves(runs: list[dict], path: Path, smooth: int = 5) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = sorted(runs, key=lambda r: (bool(r["settings"]["block_length_mixture"]), r["settings"]["block_length"]))
    lengths = sorted({r["settings"]["block_length"] for r in runs})
    cmap = plt.get_cmap("viridis", max(2, len(lengths)))
    labelled = set()
    for r in runs:
        rows = read_metrics(r["run_dir"], "train/loss")
        if not rows:
            continue
        l = r["settings"]["block_length"]
        mixture = bool(r["settings"]["block_length_mixture"])
        label = "mixture" if mixture else f"L'={l}"
        ax.plot(
            [s for s, _ in rows],
            moving_average([v for _, v in rows], smooth),
            linewidth=0.8,
            alpha=0.8,
            color="black" if mixture else cmap(lengths.index(l)),
            linestyle="--" if mixture else "-",
            label=None if label in labelled else label,
        )
        labelled.add(label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train/loss (NELBO nats/token, moving average of {smooth} logs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def clip_variance(runs: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_l = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.get("clip") and not r["settings"]["block_length_mixture"] and r["settings"]["clip_search"] != "apply":
            for b, o, v in r["clip"]["windows"]:
                by_l[r["settings"]["block_length"]][(b, o)].append(v)
    windows = sorted({w for d in by_l.values() for w in d})
    for l, d in sorted(by_l.items()):
        ax.plot(
            range(len(windows)),
            [_mean_sd(d[w])[0] if w in d else float("nan") for w in windows],
            marker="o",
            markersize=3,
            label=f"L'={l}",
        )
    ax.set_xticks(range(len(windows)), [f"{b:g}–{o:g}" for b, o in windows], rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("clipping window [beta, omega]")
    ax.set_ylabel("variance of the per-block NELBO estimate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
