"""``blockdiff sweep --report DIR``: every finished run below ``DIR`` -> a rich table, CSVs, markdown, plots.

Reads each ``summary.json`` (written by ``sweep.run_one``) and its ``logs/metrics.csv``. Runs that differ
only in ``trainer.seed`` form one group; groups are reported as mean ± sample standard deviation over
seeds (``n`` says how many; a group of one run shows its value alone, without a spread). Writes into ``DIR``:

* ``results.csv`` — one row per run (NELBO/PPL/BPB at the trained block length, clip-search window);
* ``evals.csv`` / ``samples.csv`` — one row per (run, inference block length) / (run, sampling setting);
* ``results.md`` — the grouped tables (bounds, inference block lengths, sampling), after the lines of any
  ``checks`` the caller passes (hypothesis checks live with their experiment, e.g.
  ``experiments/block_length/ordering.py``, not in the library);
* ``*.png`` — PPL vs block length, quality vs NFE per token, training loss curves, NELBO variance vs
  clipping window (``plots.py``; needs matplotlib, the ``plots`` extra).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from blockdiff import tables
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.sweeps.spec import SUMMARY_FILE, read_summary

__all__ = ["load_summaries", "report", "variant", "sampler_label", "mean_sd", "format_mean_sd", "group_rows", "Check"]


Check = Callable[[list[dict]], str]  # results rows (one per run, as in results.csv) -> one line for the report


def load_summaries(root: str | Path) -> list[dict]:
    """Every run's summary below ``root`` (with ``run_dir`` added); ``ValueError`` if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"sweep report: {root} is not a directory")
    runs = []
    for path in sorted(root.rglob(SUMMARY_FILE)):
        summary = read_summary(path)
        summary["run_dir"] = str(path.parent)
        runs.append(summary)
    if not runs:
        raise UsageError(f"sweep report: {root} holds no finished runs (no */{SUMMARY_FILE}); run `blockdiff sweep "
            "FILE` first")
    return runs


def variant(run: dict) -> str:
    """What was trained, ignoring block length and seed: the schedule / objective label of a run (``uniform noise,
    ...`` under ``noise.kind=uniform``; ``, distilled`` for a run trained on ``data.source=distilled:...``; the context
    ``L=...`` is prefixed by ``_rows`` when runs differ in it)."""
    settings = run["settings"]
    label = _objective(settings)
    source = settings.get("data_source") or run.get("values", {}).get("data.source") or ""
    if str(source).startswith("distilled:"):  # trained on a teacher's continuations, not on the corpus
        label += ", distilled"
    if settings.get("self_conditioning"):  # (keys a summary written before issue 23 lacks)
        label += ", self-conditioning"
    if settings.get("certainty_weight"):
        label += f", certainty {settings['certainty_weight']:g}"
    values = run.get("values", {})
    fraction, end = settings.get("mask_floor") or [values.get("curriculum.mask_floor_fraction", 0.0),
                                                   values.get("curriculum.mask_floor_end", 0.5)]
    if fraction:
        label += f", mask floor -> {end:g} over {fraction:g}"
    return "uniform noise, " + label if settings.get("noise_kind", "absorbing") == "uniform" else label


def _objective(s: dict) -> str:
    if s["block_length_mixture"]:
        return "mixture " + "/".join(f"{k}:{v:g}" for k, v in s["block_length_mixture"].items())
    if s["clip_search"] == "apply":
        return "clip search (applied)"
    if (s["beta"], s["omega"]) != (0.0, 1.0):
        return f"clipped U[{s['beta']:g},{s['omega']:g}]"
    return f"{s['schedule']} U[0,1]"


def sampler_label(record: dict) -> str:
    """``threshold tau=0.9``, ``fixed 2/step``, ``first_hitting``: the sampler and the knob that sets its NFE."""
    name = record["sampler"]
    beams = "block_beams" in record  # a beam setting, 1x1 (plain sampling through the beam loop) included
    tail = f", beams {record.get('block_beams', 1)}x{record.get('beam_width', 1)}" if beams else ""
    tail = _native_tail(record) + tail
    if name == "entropy_bound":
        return f"entropy_bound {record.get('entropy_bound', 0.5):g}{tail}"
    if name in ("edit", "renoise"):
        return f"{name} tau={record.get('tau', 0.9):g}{tail}"
    if name == "threshold":
        return f"threshold tau={record.get('tau', 0.9):g}{tail}"
    if name == "fixed" and record.get("tokens_per_step"):
        return f"fixed {record['tokens_per_step']}/step{tail}"
    if record.get("steps_per_block"):
        return f"{name} {record['steps_per_block']} steps/block{tail}"
    return name + tail


def _native_tail(record: dict) -> str:
    """The issue-23 settings of a sample record that change its NFE: the temperature schedule (entropy_bound), the
    editing threshold (edit) and the adaptive stop (any sampler); ``""`` when none is set."""
    parts = []
    if record["sampler"] == "entropy_bound" and record.get("t_max") is not None:
        parts.append(f"t {record['t_max']:g}->{record['t_min']:g}")
    if record["sampler"] == "edit":
        parts.append(f"edit>{record.get('editing_threshold', 0.5):g}")
    if record.get("stop_stable_steps") is not None:
        parts.append(f"stop {record['stop_stable_steps']}/{record.get('stop_entropy', 0.005):g}")
    return "".join(", " + p for p in parts)


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan")), len(values)


def _clip_windows(rows: list[dict]) -> str:
    """The distinct clip windows ``[beta,omega]`` the runs of a group chose, or ``–`` if none searched."""
    windows = {f"[{r['clip_beta']:g},{r['clip_omega']:g}]" for r in rows if r["clip_beta"] is not None}
    return ", ".join(sorted(windows)) or "–"


def _pm(values: list[float], digits: int = 3) -> str:
    """``mean ± sd`` over the finite values; one value alone (no spread to show), ``–`` for none."""
    return format_mean_sd(*mean_sd(values), digits)


def format_mean_sd(m: float, sd: float, n: int, digits: int) -> str:
    if n == 0:
        return "–"
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _native(run: dict) -> dict:
    """The evaluation at the block length the run was trained (and generates) with."""
    l = run["settings"]["block_length"]
    for e in run.get("eval", []):
        if e["block_length"] == l:
            return e
    f = run["final"]
    return {"block_length": l, "nll": f.get("val/nll"), "ppl": f.get("val/ppl"), "bpb": f.get("val/bpb")}


def _rows(runs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    results, evals, samples = [], [], []
    contexts = len({r["settings"]["max_seq_len"] for r in runs}) > 1
    for r in runs:
        s, native, clip = r["settings"], _native(r), r.get("clip") or {}
        label = f"L={s['max_seq_len']} {variant(r)}" if contexts else variant(r)
        base = {"sweep": r["sweep"], "run": r["name"], "variant": label, "block_length": s["block_length"],
                "seed": s["seed"], "max_seq_len": s["max_seq_len"]}
        full = next((v for b, o, v in clip.get("windows", []) if (b, o) == (0.0, 1.0)), None)
        results.append({**base, "steps": r["train"]["steps"], "tokens": r["train"]["tokens"],
                        "minutes": round(r["train"]["minutes"], 2), "nll": native["nll"], "ppl": native["ppl"],
                        "bpb": native["bpb"], "clip_beta": clip.get("beta"), "clip_omega": clip.get("omega"),
                        "clip_var": clip.get("variance"), "var_U01": full})
        for e in r.get("eval", []):
            scores = {"nll": e["nll"], "ppl": e["ppl"], "bpb": e["bpb"]}
            evals.append({**base, "eval_block_length": e["block_length"], **scores})
        for smp in r.get("samples", []):
            samples.append({**base, "sampler": sampler_label(smp), "tau": smp.get("tau"),
                            "tokens_per_step": smp.get("tokens_per_step"),
                            "sample_block_length": smp["block_length"], "nfe_per_token": smp["nfe_per_token"],
                            "row_forwards_per_token": smp.get("row_forwards_per_token", smp["nfe_per_token"]),
                            "rewrites_per_token": smp.get("rewrites_per_token", 0.0),
                            "seconds_per_token": smp.get("seconds_per_token"),
                            "gen_nll": smp.get("gen_nll"), "entropy": smp["entropy"],
                            "distinct_2": smp.get("distinct_2"), "example": smp["example"]})
    return results, evals, samples


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def group_rows(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(x).zfill(6) for x in kv[0])))


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(root: str | Path, console=None, checks: Sequence[Check] = ()) -> list[Path]:
    """Write results.csv, evals.csv, samples.csv, results.md and the plots into ``root``; print the table.

    Each of ``checks`` turns the results rows into one line, written above the tables and printed after them."""
    root = Path(root)
    runs = load_summaries(root)
    results, evals, samples = _rows(runs)
    written = [root / "results.csv", root / "evals.csv", root / "samples.csv", root / "results.md"]
    _write_csv(written[0], results)
    _write_csv(written[1], evals)
    _write_csv(written[2], [{k: v for k, v in s.items() if k != "example"} for s in samples])

    bound_rows = []
    for (var, l), rows in group_rows(results, ("variant", "block_length")).items():
        bound_rows.append([var, l, len(rows), _pm([r["nll"] for r in rows]), _pm([r["ppl"] for r in rows], 2),
                           _pm([r["bpb"] for r in rows]), _pm([r["clip_var"] for r in rows], 2),
                           _clip_windows(rows),
                           _pm([r["minutes"] for r in rows], 1)])
    bound_header = ["variant", "L' (train)", "seeds", "NELBO nats/tok", "PPL ≤", "BPB ≤", "min clip var",
                    "min-var window", "minutes"]
    eval_rows = [[var, l, el, len(rows), _pm([r["nll"] for r in rows]), _pm([r["ppl"] for r in rows], 2),
                  _pm([r["bpb"] for r in rows])]
                 for (var, l, el), rows in group_rows(evals, ("variant", "block_length", "eval_block_length")).items()]
    sample_rows = [[var, l, smp, sl, len(rows),
                    _pm([r["nfe_per_token"] for r in rows], 3), _pm([r["row_forwards_per_token"] for r in rows], 2),
                    _pm([r["gen_nll"] for r in rows], 3), _pm([r["entropy"] for r in rows], 2),
                    _pm([r["distinct_2"] for r in rows if r["distinct_2"] is not None], 3),
                    _pm([r["rewrites_per_token"] for r in rows], 3)]
                   for (var, l, smp, sl), rows in group_rows(
                       samples, ("variant", "block_length", "sampler", "sample_block_length")).items()]
    lines = [check(results) for check in checks]
    md = [f"# Sweep report: {root}", "", f"{len(runs)} runs; mean ± sample sd over seeds.", "",
          *(x for line in lines for x in (line, "")),
          "## Held-out NELBO bounds at the trained block length", "", _md_table(bound_header, bound_rows), "",
          "## NELBO at inference block lengths", "",
          _md_table(["variant", "L' (train)", "L' (eval)", "seeds", "NELBO nats/tok", "PPL ≤", "BPB ≤"], eval_rows)]
    if sample_rows:
        md += ["", "## Sampling: NFE per token and quality (AR NLL of the samples under the reference run)", "",
               _md_table(["variant", "L' (train)", "sampler", "L' (sample)", "seeds", "NFE/token",
                          "row forwards/token", "gen NLL (nats/tok)", "unigram entropy (bits)", "distinct bigrams",
                          "rewrites/token"],
                         sample_rows)]
    plots = _plots(root, runs, results, evals, samples)
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    written[3].write_text("\n".join(md) + "\n")
    if console is not None:  # user text (the directory, variant names) is never read as markup; rows never cut
        tables.print_table(console, bound_header, bound_rows, title=f"sweep report — {root}")
        for line in lines:
            console.print(line, markup=False, highlight=False)
    return written + plots


def _plots(root: Path, runs, results, evals, samples) -> list[Path]:
    try:
        from blockdiff.sweeps import plots
    except ImportError:  # matplotlib is an optional extra
        return []
    out = [plots.ppl_vs_block_length(results, evals, root / "ppl_vs_block_length.png"),
           plots.loss_curves(runs, root / "loss_curves.png")]
    if samples:
        out.append(plots.quality_vs_nfe(samples, root / "quality_vs_nfe.png"))
    if any(r.get("clip") for r in runs):
        out.append(plots.clip_variance(runs, root / "clip_variance.png"))
    return [p for p in out if p is not None]
