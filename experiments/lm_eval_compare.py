"""lm-eval on the shipped local tasks (tests/lm_eval_tasks): blockdiff models vs lm-eval's own `hf` backend.

Rows: the `hf` model type on a plain HF causal LM, then the `blockdiff` model type on blockdiff model directories
(each given as DIR[:key=value,...], the model args). Every row runs the same tasks through `lm_eval.simple_evaluate`;
the table has each task's metric and the wall time per request (the evaluator's requests of that task; the model is
loaded once per row, before, and its loading time is recorded apart as `load_seconds`). Wall times and the
environment header come from `_timing.py`; `results.json` and `table.md` go to `--out` (default
`experiments/results/lm_eval_compare`; a second model family to `experiments/results/lm_eval_compare/<name>`).

    python experiments/lm_eval_compare.py --hf runs/demo_base \\
        --blockdiff runs/demo_ar:add_bos_token=False --blockdiff runs/demo_ar \\
        --blockdiff runs/demo_bl4:mc_samples=32
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import _timing
from _report import results_dir, write_report
from _timing import Stopwatch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = Path(__file__).resolve().parents[1] / "tests" / "lm_eval_tasks"
METRICS = {"blockdiff_mc": ("acc,none", "acc_norm,none"), "blockdiff_gen": ("exact_match,none",),
           "blockdiff_ppl": ("word_perplexity,none", "bits_per_byte,none")}


def model_args(spec: str) -> tuple[str, dict]:
    """``DIR[:key=value,...]`` -> (the row's label, lm-eval model args)."""
    path, _, extra = spec.partition(":")
    args = {"pretrained": path}
    for item in filter(None, extra.split(",")):
        k, v = item.split("=", 1)
        args[k] = {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v)
    return f"blockdiff {spec}", args


def run_row(model: str, args: dict, tasks: list[str], manager) -> dict:
    """Load the model once (timed on its own), then evaluate each task; the per-request time excludes loading."""
    import lm_eval
    from lm_eval.api.registry import get_model

    with Stopwatch() as load:
        lm = get_model(model).create_from_arg_obj(dict(args), {"batch_size": args.get("batch_size", 8),
                                                               "device": "cpu"})
    out = {"load_seconds": load.seconds}
    for task in tasks:  # one task at a time, so each gets its own wall time
        with Stopwatch() as watch:
            result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0,
                                             log_samples=True)
        seconds = watch.seconds
        requests = sum(len(s["resps"]) for s in result["samples"][task])
        out[task] = {**{m: result["results"][task][m] for m in METRICS[task]}, "seconds": seconds,
                     "requests": requests, "seconds_per_request": seconds / requests,
                     "first_responses": [s["resps"][0] for s in result["samples"][task][:3]]}
    return out


def main() -> None:
    from lm_eval.tasks import TaskManager

    import blockdiff.evaluation.lm_eval_backend  # noqa: F401 - registers the blockdiff model type

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", help="a plain HF causal LM directory for lm-eval's own hf model type")
    p.add_argument("--hf-gguf", help="with --hf: the GGUF file in that directory (e.g. the offline SmolLM2)")
    p.add_argument("--blockdiff", action="append", default=[], help="DIR[:key=value,...] (repeatable)")
    p.add_argument("--tasks", default="blockdiff_mc,blockdiff_gen,blockdiff_ppl")
    p.add_argument("--out", type=Path, default=results_dir(__file__))
    p.add_argument("--table-only", action="store_true", help="rewrite table.md from OUT/results.json")
    a = p.parse_args()
    if a.table_only:
        write_table(json.loads((a.out / "results.json").read_text()), a.out)
        return
    manager, tasks, rows = TaskManager(include_path=str(TASKS)), a.tasks.split(","), {}
    if a.hf:
        hf_args = {"pretrained": a.hf, "dtype": "float32", **({"gguf_file": a.hf_gguf} if a.hf_gguf else {})}
        rows[f"hf ({a.hf_gguf or a.hf})"] = run_row("hf", hf_args, tasks, manager)
    for spec in a.blockdiff:
        label, args = model_args(spec)
        rows[label] = run_row("blockdiff", args, tasks, manager)
    write_table({"environment": _timing.environment(), "rows": rows}, a.out)


COLUMNS = ["model", "MC acc", "MC acc_norm", "s/request (MC)", "gen exact match", "s/request (gen)",
           "PPL task word PPL", "bits/byte", "s/request (PPL)", "load s"]


def write_table(report: dict, out: Path) -> None:
    """``results.json`` (``report``) and ``table.md`` (``_report.write_report``); reads reports written before the
    environment was recorded too (the rows were the whole file then)."""
    rows, env = report.get("rows", report), report.get("environment")
    table = []
    nan = float("nan")
    for label, r in rows.items():
        mc, gen, ppl = r.get("blockdiff_mc", {}), r.get("blockdiff_gen", {}), r.get("blockdiff_ppl", {})
        table.append([
            label, f"{mc.get('acc,none', nan):.3f}", f"{mc.get('acc_norm,none', nan):.3f}",
            f"{mc.get('seconds_per_request', nan):.4f}", f"{gen.get('exact_match,none', nan):.3f}",
            f"{gen.get('seconds_per_request', nan):.3f}", f"{ppl.get('word_perplexity,none', nan):.1f}",
            f"{ppl.get('bits_per_byte,none', nan):.3f}", f"{ppl.get('seconds_per_request', nan):.3f}",
            f"{r.get('load_seconds', nan):.1f}",
        ])
    write_report(out, report, _timing.header(env) if env else "environment not recorded", COLUMNS, table)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
