"""Benchmark: block-diffusion generation (block KV cache, samplers) vs Hugging Face AR ``generate()``.

What is measured, in ONE process, on one prompt set (8 fixed strings such as ``"ROMEO.\\n"``, tokenised with
the models' tokenizer, BOS prepended; batch 1 uses prompt ``round % 8``, batch 8 uses all eight, ragged):

* **Rows**, per group (new tokens ``N`` in 256 and 1,024 — ``--quick``: 32 — and batch 1 or 8; by default batch 8
  only for N <= 256, ``--max-batched-tokens``; 3 rounds for N <= 256, 2 beyond, ``--reps``/``--reps-long``;
  ``--skip-slow`` drops the no-cache rows beyond 256 tokens):
  - ``HF AR``, the reference: ``backbone.generate()`` (its own KV cache) of the same-size network trained as a
    plain AR LM (``<models-dir>/gen_ar``), ``do_sample=True, temperature=1.0, top_k=0``,
    ``min_new_tokens = max_new_tokens = N``, the mask token suppressed (our SUBS head never emits it either);
    batch 8 is left-padded with an attention mask. Past the 256-token training context it simply goes on
    (RoPE extrapolates; its cache grows to prompt + N);
  - ours, ``model.generate(prompts, max_new_tokens=N, eos_token_id=None, temperature=1.0)`` (EOS disabled, so
    every row writes exactly N tokens): the threshold sampler (tau = 0.9) with and without the block cache
    (``use_cache=False``) on the block length 4, 8 and 16 models (``gen_bl{4,8,16}``), and, on the block length
    4 model with cache, first-hitting, threshold tau 0.7 / 0.8 and fixed 2 tokens per step.
* **tokens/s** = batch x N / wall time of one ``generate`` call (``_timing.timed``, ``torch.inference_mode``).
  Rows of a group are interleaved round-robin (``_timing.rotations``: the starting row rotates every round; every
  row gets one untimed 32-token warm-up first); ``x HF`` = median over rounds of (row tokens/s / HF tokens/s of the
  same round) (``_timing.same_round_ratio``), ``x no-cache`` likewise against the same model's no-cache row.
* **NFE/tok** = network forwards / new tokens per sequence (a batched forward counts once; HF = 1).
* **AR NLL**: nats/token of the generated continuations under the ``gen_ar`` network (exact causal LM loss, the
  mask token's logit removed), scored only on the continuation, in windows of at most 256 tokens with stride
  128 (every token is scored once, with 128-255 tokens of truncated left context, or all there is).
  Token-weighted over every sample of every round. **entropy** = unigram entropy (bits) of each
  continuation's tokens, averaged over samples (repetition lowers it). **max cache** = ``out.max_cache_length``
  (HF: the final cache length); ours slides a window of the training context (256) by default.
* **Targets**: block cache >= 5x no cache at 1,024 tokens; threshold (tau 0.9) <= 0.5 NFE per token;
  threshold tau 0.9 (L'=4) >= 1.5x HF AR tokens/s with AR NLL within 10% of first-hitting (<= 1.1x).

``--random-init`` builds untrained networks of the same size (byte tokenizer) to test the script; their
numbers mean nothing (an untrained model is never confident, so threshold = one token per step).
``OMP_WAIT_POLICY=PASSIVE`` unless given (``_timing.py``). Writes ``results.json`` (environment, per-round raw
numbers) and ``table.md`` into ``--out`` (default ``experiments/results/bench_generation``)::

    python experiments/bench_generation.py --quick --random-init --out /tmp/bench_gen
    python experiments/bench_generation.py --models-dir runs
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import Stopwatch, rotations, same_round_ratio, timed
from rich.console import Console
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from blockdiff import BlockDiffusionLM, BlockDiffusionSpec, load_model_dir
from blockdiff.config import ModelConfig
from blockdiff.evaluation.scoring import causal_lm_logits, continuation_nll, unigram_entropy
from blockdiff.modeling.tokenizer import byte_tokenizer
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.text import encode_prompts
from blockdiff.training.builders import build_backbone

PROMPTS = ["ROMEO.\n", "JULIET.\n", "HAMLET.\n", "KING LEAR.\n", "MACBETH.\n", "OTHELLO.\n", "PORTIA.\n", "FALSTAFF.\n"]
BLOCK_LENGTHS = (4, 8, 16)
CONTEXT = 256  # training context of the gen_* models: the scoring window and the default sliding window
SCORE_STRIDE = 128
WARMUP_TOKENS = 32


@dataclass
class Row:
    name: str
    new_tokens: int
    batch: int
    model: str  # "ar" (HF generate) or "bl4" / "bl8" / "bl16"
    settings: dict = field(default_factory=dict)  # model.generate overrides (ours only)
    times: list[float] = field(default_factory=list)  # seconds per round
    nfe: list[int] = field(default_factory=list)  # forwards per round
    max_cache: list[int] = field(default_factory=list)
    samples: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, continuation)

    @property
    def ours(self) -> bool:
        return self.model != "ar"


def load_models(args) -> tuple[dict[str, BlockDiffusionLM], object]:
    """``({"ar": ..., "bl4": ..., ...}, tokenizer)``: trained from ``--models-dir`` or freshly initialised."""
    if args.random_init:
        tok = byte_tokenizer()
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        models = {}
        for key, bl, shift in [("ar", 1, True)] + [(f"bl{b}", b, False) for b in BLOCK_LENGTHS]:
            torch.manual_seed(args.seed + bl)
            backbone = build_backbone(ModelConfig(), len(tok), CONTEXT, **ids)
            models[key] = BlockDiffusionLM(backbone, BlockDiffusionSpec(tok.mask_token_id, bl, shift, CONTEXT)).eval()
        return models, tok
    loaded = {key: load_model_dir(args.models_dir / f"gen_{key}") for key in ["ar"] + [f"bl{b}" for b in BLOCK_LENGTHS]}
    tok = loaded["ar"].tokenizer
    ar = loaded["ar"].model
    if ar.block_length != 1 or not ar.spec.logit_shift:
        raise ValueError(f"{args.models_dir}/gen_ar must be block length 1 with logit shift (a plain AR LM)")
    for b in BLOCK_LENGTHS:
        lm = loaded[f"bl{b}"]
        if lm.model.block_length != b:
            raise ValueError(f"{lm.directory} has block length {lm.model.block_length}, expected {b}")
        if lm.tokenizer.get_vocab() != tok.get_vocab():
            raise ValueError(f"{lm.directory} uses a different tokenizer than gen_ar: AR NLL would be meaningless")
    from_ar = args.models_dir / "gen_bl4_from_ar"
    if (from_ar / "model").is_dir():  # block length 4 adapted from the AR model (model.init_from)
        lm = load_model_dir(from_ar)
        if lm.model.block_length != 4 or lm.tokenizer.get_vocab() != tok.get_vocab():
            raise ValueError(f"{from_ar} must be block length 4 with gen_ar's tokenizer")
        loaded["bl4ar"] = lm
    return {key: lm.model for key, lm in loaded.items()}, tok


def build_rows(new_tokens: list[int], batches: list[int], args) -> list[Row]:
    rows = []
    for n in new_tokens:
        for b in batches:
            if b > 1 and n > args.max_batched_tokens:
                continue
            rows.append(Row("HF AR generate", n, b, "ar"))
            for bl in BLOCK_LENGTHS:
                rows.append(Row(f"L'={bl} threshold 0.9", n, b, f"bl{bl}", dict(sampler="threshold", tau=0.9)))
                if not (args.skip_slow and n > CONTEXT):
                    no_cache = dict(sampler="threshold", tau=0.9, use_cache=False)
                    rows.append(Row(f"L'={bl} threshold 0.9 no-cache", n, b, f"bl{bl}", no_cache))
            rows.append(Row("L'=4 first_hitting", n, b, "bl4", dict(sampler="first_hitting")))
            for tau in (0.7, 0.8):
                rows.append(Row(f"L'=4 threshold {tau}", n, b, "bl4", dict(sampler="threshold", tau=tau)))
            rows.append(Row("L'=4 fixed 2/step", n, b, "bl4", dict(sampler="fixed", tokens_per_step=2)))
            if args.from_ar:
                rows.append(Row("L'=4 from AR first_hitting", n, b, "bl4ar", dict(sampler="first_hitting")))
                for tau in (0.7, 0.9):
                    rows.append(Row(f"L'=4 from AR threshold {tau}", n, b, "bl4ar", dict(sampler="threshold", tau=tau)))
                rows.append(Row("L'=4 from AR fixed 2/step", n, b, "bl4ar", dict(sampler="fixed", tokens_per_step=2)))
    return rows


def run_row(row: Row, models, tok, prompts: list[list[int]], n: int, seed: int):
    """One timed ``generate`` call; returns ``(seconds, nfe, max_cache, [(prompt, continuation)])``."""
    model = models[row.model]
    if not row.ours:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])  # (b, p) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        config = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, max_new_tokens=n, min_new_tokens=n,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, suppress_tokens=[model.mask_token_id],
        )
        torch.manual_seed(seed)
        call = timed(lambda: model.backbone.generate(input_ids=ids, attention_mask=mask, generation_config=config))
        seqs = call.result
        new = seqs[:, width:].tolist()
        return call.seconds, n, seqs.shape[1] - 1, [(p, c) for p, c in zip(prompts, new)]
    config = BlockDiffusionGenerationConfig(
        max_new_tokens=n, eos_token_id=None, pad_token_id=tok.pad_token_id, temperature=1.0, **row.settings
    )
    generator = torch.Generator().manual_seed(seed)
    call = timed(lambda: model.generate(prompts, generation_config=config, generator=generator))
    out = call.result
    return call.seconds, out.nfe, out.max_cache_length, [(p, out.new_tokens(i)) for i, p in enumerate(prompts)]


def ar_nll(ar: BlockDiffusionLM, prompt: list[int], cont: list[int]) -> tuple[float, int]:
    """Summed NLL (nats) of ``cont`` after ``prompt`` under the AR network, windows <= CONTEXT, stride SCORE_STRIDE
    (``blockdiff.evaluation.scoring.continuation_nll``, the scorer every evaluation uses)."""
    scorer = causal_lm_logits(ar.backbone, suppress_token_id=ar.mask_token_id)
    return continuation_nll(scorer, prompt, cont, context=CONTEXT, stride=SCORE_STRIDE)


def summarise(rows: list[Row], models) -> list[dict]:
    out = []
    for row in rows:
        ref = next(r for r in rows if r.new_tokens == row.new_tokens and r.batch == row.batch and not r.ours)
        tps = [row.batch * row.new_tokens / t for t in row.times]
        ref_tps = [ref.batch * ref.new_tokens / t for t in ref.times]
        no_cache = next((r for r in rows if r.name == row.name + " no-cache" and r.batch == row.batch
                         and r.new_tokens == row.new_tokens), None)
        nll = [ar_nll(models["ar"], p, c) for p, c in row.samples]
        out.append(dict(
            name=row.name, new_tokens=row.new_tokens, batch=row.batch, model=row.model, settings=row.settings,
            tokens_per_s=statistics.median(tps),
            x_hf=same_round_ratio(tps, ref_tps),
            x_no_cache=same_round_ratio(no_cache.times, row.times) if no_cache else None,
            nfe_per_token=statistics.mean(row.nfe) / row.new_tokens,
            ar_nll=sum(s for s, _ in nll) / sum(k for _, k in nll),
            entropy_bits=statistics.mean(unigram_entropy(c, base=2) for _, c in row.samples),
            max_cache=max(row.max_cache),
            times_s=row.times, nfe=row.nfe,
        ))
    return out


def targets(results: list[dict]) -> list[dict]:
    def find(name, n, b):
        return next((r for r in results if r["name"] == name and r["new_tokens"] == n and r["batch"] == b), None)

    checks = []
    groups = sorted({(r["new_tokens"], r["batch"]) for r in results})
    longest = max(n for n, _ in groups)  # the cache target is checked at the longest generation (1,024)
    for n, b in groups:
        for bl in BLOCK_LENGTHS:
            row = find(f"L'={bl} threshold 0.9", n, b)
            where = f"L'={bl}, {n} tok, batch {b}"
            if n == longest:
                value = row["x_no_cache"]
                checks.append(dict(target=f"cache >= 5x no-cache ({where})", value=value,
                                   ok=None if value is None else value >= 5.0))
            checks.append(dict(target=f"threshold 0.9 <= 0.5 NFE/tok ({where})", value=row["nfe_per_token"],
                               ok=row["nfe_per_token"] <= 0.5))
        for prefix in ("L'=4", "L'=4 from AR"):
            thr, fh = find(f"{prefix} threshold 0.9", n, b), find(f"{prefix} first_hitting", n, b)
            if thr is None or fh is None:
                continue
            checks.append(dict(target=f"threshold 0.9 >= 1.5x HF AR tok/s ({prefix}, {n} tok, batch {b})",
                               value=thr["x_hf"], ok=thr["x_hf"] >= 1.5))
            checks.append(dict(target=f"threshold 0.9 <= 0.5 NFE/tok ({prefix}, {n} tok, batch {b})",
                               value=thr["nfe_per_token"], ok=thr["nfe_per_token"] <= 0.5))
            rel = thr["ar_nll"] / fh["ar_nll"]
            checks.append(dict(target=f"  and AR NLL <= 1.1x first-hitting's ({prefix}, {n} tok, batch {b})",
                               value=rel, ok=rel <= 1.1))
    return checks


def run(args, console: Console) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    whole = Stopwatch()
    models, tok = load_models(args)
    args.from_ar = "bl4ar" in models
    prompts = encode_prompts(tok, PROMPTS)
    new_tokens = [32] if args.quick else args.new_tokens
    rows = build_rows(new_tokens, args.batch_sizes, args)
    with torch.inference_mode():
        for row in rows:  # warm-up: one short untimed call per row
            run_row(row, models, tok, prompts[: row.batch], min(WARMUP_TOKENS, row.new_tokens), args.seed)
        console.log(f"warmed up {len(rows)} rows")
        groups = sorted({(r.new_tokens, r.batch) for r in rows})
        for n, b in groups:
            group = [r for r in rows if (r.new_tokens, r.batch) == (n, b)]
            reps = args.reps if n <= CONTEXT else args.reps_long
            for rnd, order in rotations(group, reps):
                batch_prompts = prompts if b > 1 else [prompts[rnd % len(prompts)]]
                for row in order:
                    seconds, nfe, cache, samples = run_row(row, models, tok, batch_prompts, n, args.seed + rnd)
                    if any(len(c) != n for _, c in samples):
                        raise RuntimeError(f"{row.name}: a sample did not get exactly {n} new tokens")
                    row.times.append(seconds)
                    row.nfe.append(nfe)
                    row.max_cache.append(cache)
                    row.samples += samples
                console.log(f"{n} tokens, batch {b}: round {rnd + 1}/{reps} done")
        results = summarise(rows, models)
    skipped = "; no-cache rows beyond 256 tokens skipped (--skip-slow)" if args.skip_slow else ""
    notes = [
        f"prompts: {len(PROMPTS)} fixed strings + BOS; batch 1 uses prompt (round % 8); batch 8 all of them, ragged",
        f"rounds: {args.reps} for <= {CONTEXT} new tokens, {args.reps_long} beyond; batch > 1 only for <= "
        f"{args.max_batched_tokens} new tokens{skipped}",
        f"beyond {CONTEXT} tokens the HF AR reference runs past its training context (RoPE extrapolation, cache "
        f"grows); ours slides a {CONTEXT}-token window",
    ]
    if args.random_init:
        notes.append("RANDOM-INIT networks: timings test the script only; NFE, NLL and entropy are meaningless")
    return dict(
        environment=_timing.environment(),
        models="random-init" if args.random_init else str(args.models_dir), vocab=len(tok),
        reps=args.reps, reps_long=args.reps_long, wall_s=whole.elapsed(), notes=notes,
        results=results, targets=targets(results),
    )


COLUMNS = ["N", "b", "row", "tok/s", "x HF", "x no-cache", "NFE/tok", "AR NLL", "entropy", "max cache"]


def table_rows(report: dict) -> list[list[str]]:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    return [
        [str(r["new_tokens"]), str(r["batch"]), r["name"], f"{r['tokens_per_s']:.0f}", f"{r['x_hf']:.2f}",
         fmt(r["x_no_cache"], ".2f"), f"{r['nfe_per_token']:.3f}", f"{r['ar_nll']:.3f}", f"{r['entropy_bits']:.2f}",
         str(r["max_cache"])]
        for r in report["results"]
    ]


def target_lines(report: dict) -> list[str]:
    def verdict(ok):
        return "not measured" if ok is None else "ok" if ok else "MISSED"

    return [f"{c['target']}: {'-' if c['value'] is None else format(c['value'], '.3f')} {verdict(c['ok'])}"
            for c in report["targets"]]


def header(report: dict) -> str:
    return "\n".join([
        _timing.header(report["environment"]),
        f"models: {report['models']} (vocab {report['vocab']}); whole run {report['wall_s'] / 60:.1f} min",
        *report["notes"],
    ])


FOOTER = (
    "tok/s: batch x N / wall time (median over rounds); x HF, x no-cache: median over rounds of same-round ratios. "
    "NFE/tok: forwards per new token per sequence (HF = 1).\n"
    "AR NLL: nats/token of the continuation under the gen_ar network (windows <= 256, stride 128); "
    "entropy: unigram bits per continuation; max cache: largest KV cache in tokens."
)


def write_outputs(report: dict, out_dir: Path) -> None:
    tail = ["", "Targets:", ""] + [f"- {line}" for line in target_lines(report)]
    write_report(out_dir, report, header(report) + "\n" + FOOTER, COLUMNS, table_rows(report), tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("runs"), help="holds gen_ar, gen_bl{4,8,16}")
    parser.add_argument("--random-init", action="store_true", help="untrained networks of the same size (testing)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 new tokens, 2 rounds")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-batched-tokens", type=int, default=256, help="batch > 1 only up to this many new tokens")
    parser.add_argument("--reps", type=int, default=3, help="rounds for groups of <= 256 new tokens")
    parser.add_argument("--reps-long", type=int, default=2, help="rounds for groups of > 256 new tokens")
    parser.add_argument("--skip-slow", action="store_true", help="skip the no-cache rows beyond 256 new tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if args.quick:
        args.reps = args.reps_long = 2
    hf_logging.set_verbosity_error()  # HF warns on every call past max_position_embeddings; noted once instead

    console = Console(width=max(Console().width, 140))
    report = run(args, console)
    title = "Generation: block diffusion (ours) vs HF AR generate(), same network size"
    print_report(console, title, COLUMNS, table_rows(report), header(report), FOOTER, left="row")
    for line in target_lines(report):
        console.print(line, markup=False)
    write_outputs(report, args.out)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
