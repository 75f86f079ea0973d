"""Benchmark: native block sampling (no drafter) against HF ``generate()`` of the AR parent, batch 1 (issues 22, 23).

Two groups, each timed round-robin in ONE process (``_timing.rotations``; medians of same-round ratios), one prompt per
round (``round % len(prompts)``), every row warmed up first with one untimed short call:

* ``--ablation DIR`` (issue 23): the from-AR block diffusers of the native-decoding sweep (experiments/native), each
  with a sampler setting, against HF ``generate()`` of the sweep's judge, which is also their AR parent (the plain AR
  network of ``DIR/<judge run>``; T = 1, ``top_k=0``, the mask token suppressed). Rows come from ``--row NAME RUN
  KEY=VALUE ...`` (the settings chosen on the sweep's own prompts). The prompts here are **other** character names
  than the sweep's (``HELD_OUT_PROMPTS``): nothing reported was chosen on them. Columns: tokens/s, × HF, forwards per
  token, the judge's NLL of the continuation (nats/token), unigram entropy (bits), distinct bigrams.
* ``--smollm2`` (issue 22, "native block sampling packed vs unpacked"): SmolLM2-135M wrapped as an L' = 4 block
  diffuser (the untrained wrapper: the fine-tuning recipe's network at step 0), sampled with ``fixed`` one token per
  forward (what the fine-tuned L' = 4 model measured: 1.00 tokens per forward, docs/benchmarks.md), on the lean CPU
  path (weights packed for oneDNN) and as shipped (``F.linear``/MKL), against SmolLM2's own ``generate()``. The cost
  of a block step does not depend on the weights' values, so this times what the fine-tuned model would cost; its
  text is not reported.

``OMP_WAIT_POLICY=PASSIVE`` unless given (``_timing.py``). Writes ``results.json`` and ``table.md`` to ``--out``::

    python experiments/bench_native.py --smollm2 --rounds 4 --new-tokens 64
    python experiments/bench_native.py --ablation runs/ablation/native \\
        --row "L'=4 threshold 0.9" block_length-4_self_conditioning-False_weight-0 sampler=threshold tau=0.9
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import Stopwatch, rotations, same_round_ratio
from bench_generation import Row, run_row
from rich.console import Console
from transformers.utils import logging as hf_logging

from blockdiff.evaluation.scoring import causal_lm_logits, continuation_nll, distinct_ngrams, unigram_entropy
from blockdiff.sampling.text import encode_prompts

HELD_OUT_PROMPTS = ["KING LEAR.\n", "MACBETH.\n", "OTHELLO.\n", "PORTIA.\n", "FALSTAFF.\n", "CORDELIA.\n"]
SMOLLM2_PROMPTS = ["The history of the printing press", "A recipe for bread:", "In the morning the harbour",
                   "Photosynthesis is the process"]
WARMUP_TOKENS = 16


def _value(text: str):
    """A ``KEY=VALUE`` value as YAML reads it (``0.9`` a float, ``true`` a bool, ``null`` None)."""
    import yaml

    return yaml.safe_load(text)


def ablation_models(args) -> tuple[dict, object, list[Row]]:
    """``(models by key, tokenizer, rows)`` for ``--ablation``: key ``ar`` is the judge, each ``--row`` its run."""
    from blockdiff.modeling.io import load_model_dir

    judge = load_model_dir(args.ablation / args.judge / "model")
    if judge.model.block_length != 1 or not judge.model.spec.logit_shift:
        raise SystemExit(f"--judge {args.judge}: not a plain AR network (block length 1, logit shift)")
    models, rows = {"ar": judge.model}, [Row("HF generate() (AR parent)", args.new_tokens, 1, "ar")]
    for name, run, *pairs in args.row:
        if run not in models:
            loaded = load_model_dir(args.ablation / run / "model")
            if loaded.tokenizer.get_vocab() != judge.tokenizer.get_vocab():
                raise SystemExit(f"--row {name}: {run} has another tokenizer than the judge")
            models[run] = loaded.model
        settings = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
        rows.append(Row(name, args.new_tokens, 1, run, settings))
    return models, judge.tokenizer, rows


def smollm2_models(args) -> tuple[dict, object, list[Row]]:
    """SmolLM2 as an L' = 4 block diffuser, once packed and once as shipped (two copies of the same weights)."""
    from blockdiff.modeling.lean import is_packed, pack_linears
    from blockdiff.training.builders import build_model
    from blockdiff.training.finetune import finetune_config

    cfg = finetune_config("smollm2", [], ["model.block_length=4"])
    tokenizer, plain = build_model(cfg, docs=None)
    _, packed = build_model(cfg, docs=None)
    pack_linears(packed.eval())
    assert is_packed(packed) and not is_packed(plain)
    one = dict(sampler="fixed", tokens_per_step=1)
    rows = [Row("SmolLM2 generate()", args.new_tokens, 1, "ar"),
            Row("L'=4 block step, 1 token/forward, lean (packed)", args.new_tokens, 1, "packed", one),
            Row("L'=4 block step, 1 token/forward, as shipped (MKL)", args.new_tokens, 1, "plain", one)]
    return {"ar": plain.eval(), "plain": plain.eval(), "packed": packed}, tokenizer, rows


def judge_nll(ar, prompt: list[int], cont: list[int]) -> tuple[float, int]:
    scorer = causal_lm_logits(ar.backbone, suppress_token_id=ar.mask_token_id)
    context = ar.spec.max_seq_len or 2048
    return continuation_nll(scorer, prompt, cont, context=context, stride=max(1, context // 2))


def summarise(rows: list[Row], judge, score: bool) -> list[dict]:
    ref = rows[0]
    out = []
    for row in rows:
        tps = [row.new_tokens / t for t in row.times]
        nll = [judge_nll(judge, p, c) for p, c in row.samples] if score else []
        out.append(dict(
            name=row.name, model=row.model, settings=row.settings, tokens_per_s=statistics.median(tps),
            x_hf=same_round_ratio(tps, [ref.new_tokens / t for t in ref.times]),
            forwards_per_token=statistics.mean(row.nfe) / row.new_tokens,
            judge_nll=sum(s for s, _ in nll) / sum(k for _, k in nll) if nll else None,
            entropy_bits=statistics.mean(unigram_entropy(c, base=2) for _, c in row.samples),
            distinct_2=statistics.mean(distinct_ngrams(c, 2) for _, c in row.samples),
            times_s=row.times, nfe=row.nfe,
        ))
    return out


def run(args, console: Console) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    whole = Stopwatch()
    models, tok, rows = smollm2_models(args) if args.smollm2 else ablation_models(args)
    prompts = encode_prompts(tok, SMOLLM2_PROMPTS if args.smollm2 else HELD_OUT_PROMPTS)
    with torch.inference_mode():
        for row in rows:
            run_row(row, models, tok, [prompts[0]], WARMUP_TOKENS, args.seed)
        for rnd, order in rotations(rows, args.rounds):
            for row in order:
                seconds, nfe, _, samples = run_row(row, models, tok, [prompts[rnd % len(prompts)]], args.new_tokens,
                                                   args.seed + rnd)
                row.times.append(seconds)
                row.nfe.append(nfe)
                row.samples += samples
            console.log(f"round {rnd + 1}/{args.rounds} done")
        results = summarise(rows, models["ar"], score=not args.smollm2)
    return dict(environment=_timing.environment(), group="smollm2" if args.smollm2 else str(args.ablation),
                judge=None if args.smollm2 else args.judge, rounds=args.rounds, new_tokens=args.new_tokens,
                prompts=SMOLLM2_PROMPTS if args.smollm2 else HELD_OUT_PROMPTS, wall_s=whole.elapsed(),
                results=results)


COLUMNS = ["row", "tok/s", "x HF", "forwards/tok", "judge NLL", "entropy", "distinct-2"]


def table_rows(report: dict) -> list[list[str]]:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    return [[r["name"], f"{r['tokens_per_s']:.1f}", f"{r['x_hf']:.2f}", f"{r['forwards_per_token']:.3f}",
             fmt(r["judge_nll"], ".3f"), f"{r['entropy_bits']:.2f}", f"{r['distinct_2']:.3f}"]
            for r in report["results"]]


def header(report: dict) -> str:
    return "\n".join([
        _timing.header(report["environment"]),
        f"group: {report['group']}; {report['rounds']} rounds x {report['new_tokens']} new tokens, batch 1, one prompt "
        f"per round of {len(report['prompts'])}; whole run {report['wall_s'] / 60:.1f} min",
        "x HF: median over rounds of same-round tokens/s ratios; judge NLL: nats/token of the continuation under the "
        "AR parent (smollm2 group: not scored, its text is an untrained wrapper's)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--smollm2", action="store_true", help="SmolLM2 L'=4 block steps, packed vs as shipped")
    group.add_argument("--ablation", type=Path, help="the native-decoding sweep's out_dir")
    parser.add_argument("--judge", default="block_length-1_logit_shift-True_beta-1_omega-1",
                        help="the judge / AR parent run under --ablation")
    parser.add_argument("--row", nargs="+", action="append", default=[], metavar="NAME RUN KEY=VALUE",
                        help="a block-diffusion row: its name, its run under --ablation, its sampler settings")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.ablation is not None and not args.row:
        parser.error("--ablation needs at least one --row NAME RUN [KEY=VALUE ...]")
    if any(len(r) < 2 for r in args.row):
        parser.error("--row needs a NAME and a RUN, then KEY=VALUE sampler settings")
    hf_logging.set_verbosity_error()
    console = Console()
    report = run(args, console)
    out = args.out or results_dir(__file__, "smollm2" if args.smollm2 else "ablation")
    write_report(out, report, header(report), COLUMNS, table_rows(report))
    print_report(console, "native block sampling vs HF generate()", COLUMNS, table_rows(report), header(report), "",
                 "row")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
