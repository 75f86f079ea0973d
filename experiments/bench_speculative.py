"""Benchmark: lossless speculative block decoding vs the base decoder's own Hugging Face ``generate()`` (issue 11).

What is measured, in ONE process (batch 1, ``--threads`` threads, fp32, ``OMP_WAIT_POLICY=PASSIVE`` set before torch
loads unless the environment already sets it, by ``_timing.py``; the output says which):

* **Prompts**: ``--num-prompts`` windows of the run's HELD-OUT split (``blockdiff.evaluation.heldout.held_out_split``
  with the model's training config: the training split is never a prompt), evenly spaced, their first
  ``--prompt-tokens`` tokens each.
* **Rows** (each writes up to ``--new-tokens`` N tokens after each prompt, stopping at EOS like ``generate``):
  - ``HF greedy`` / ``HF sampled T=0.8``: the base decoder's ``generate()`` (``top_k=0``: temperature only);
  - ``HF prompt lookup``: ``generate(prompt_lookup_num_tokens=--lookup)``, greedy (the speculative method a user can
    already run offline);
  - ``spec greedy/sampled (two-model)``: ``speculative_generate(base, model)`` — the base verifies the model's
    ``BlockDrafter`` drafts; when the model has a separate base (``model.pretrained`` of its train config, or
    ``--base``);
  - ``spec greedy/sampled (fused)``: ``speculative_generate(model, None)`` — one forward verifies with the frozen base
    and drafts with the gated adapter; when the model has a gated adapter and a causal clean stream;
  - ``... (fused, every length)``: the same with ``FusedBlockDiffusion(model, every_length=True)``, a mask block for
    every acceptance length in each forward (so a step after a rejection still checks drafts);
  - ``native threshold 0.9``: ``model.generate(sampler="threshold", tau=0.9)``, the model on its own.
* **Round-robin** (``_timing.py``): every round runs every row on every prompt, the row order rotating each round
  (one untimed short warm-up call per row first). **tok/s** = a round's new tokens / its wall time, median over rounds;
  **x HF same T** = median over rounds of the same-round ratio to the HF ``generate()`` row of the same temperature.
  ``--skip KIND`` leaves a kind of row out (e.g. ``spec2`` on a large model: two full forwards per step).
* **tok/fwd** = new tokens / forwards of the verifier (speculative: accepted + 1 per step; HF greedy = 1);
  **forwards** = every network forward per prompt (both models for two-model; counted by a hook for HF rows);
  **exact** = share of (prompt, round) samples whose continuation equals HF greedy's token for token;
  **accept hist** = steps that kept a drafts, a = 0, 1, ..., summed over samples;
  **judge NLL** = nats/token of the continuation under the base decoder (``scoring.continuation_nll``);
  **entropy** = unigram entropy (bits) of each continuation, averaged.

Writes ``results.json`` and ``table.md`` (``experiments/_report.py``) into ``--out-dir``::

    python experiments/bench_speculative.py --model runs/spec_demo --out-dir experiments/results/bench_speculative
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import Stopwatch, rotations, same_round_ratio, timed, warm_up
from rich.console import Console
from transformers.utils import logging as hf_logging

from blockdiff import load_model_dir
from blockdiff.data.distilled import distilled_dir, is_distilled_source, read_settings
from blockdiff.evaluation.heldout import held_out_split
from blockdiff.evaluation.scoring import causal_lm_logits, continuation_nll, unigram_entropy
from blockdiff.sampling.speculative import FusedBlockDiffusion, speculative_generate, supports_fused

WARMUP_TOKENS = 16


@dataclass
class Row:
    name: str
    kind: str  # hf | lookup | spec2 | fused | fused_all | native
    temperature: float = 0.0
    times: list[float] = field(default_factory=list)  # seconds per round (all prompts)
    tokens: list[int] = field(default_factory=list)  # new tokens per round
    forwards: list[int] = field(default_factory=list)  # per sample
    verifier_forwards: list[int] = field(default_factory=list)  # per sample
    hist: list[int] = field(default_factory=list)
    samples: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (prompt index, prompt, new)


class CountForwards:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def load(args):
    """``(model, base decoder or None, judge, tokenizer, train config, base name)``."""
    loaded = load_model_dir(args.model)
    model = loaded.model.float().eval()
    cfg = loaded.config
    name = args.base or cfg.model.pretrained
    base = None
    if name is not None:
        from blockdiff.modeling.pretrained import load_decoder

        base = load_decoder(name, what="--base")[0].float().eval()
    if base is None and not supports_fused(model):
        raise SystemExit(f"{args.model} has no base decoder (no model.pretrained in its train config): pass --base")
    judge = base if base is not None else copy.deepcopy(model.backbone)  # fused: the frozen base, gate off
    if base is None:
        base = judge
    return model, base, judge, loaded.tokenizer, cfg, name or "the model's own frozen base"


def heldout_prompts(cfg, tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts from the held-out tail of the model's corpus; for a model trained on a distilled set, of the
    corpus the set's prompts came from (its training split: the tail is neither a distilled prompt nor the teacher's
    text)."""
    data = cfg.data
    if is_distilled_source(data.source):
        data = dataclasses.replace(data, **read_settings(distilled_dir(data.source)).corpus)
    val = held_out_split(data, tokenizer).corpus.val
    if len(val) == 0:
        raise SystemExit("the held-out split is empty (data.val_fraction = 0?)")
    picks = sorted({round(i * (len(val) - 1) / max(1, count - 1)) for i in range(count)})
    return [val[i]["input_ids"][:length].tolist() for i in picks]


def rows_for(model, has_base: bool, temperature: float, skip: set[str]) -> list[Row]:
    rows = [Row("HF greedy", "hf"), Row(f"HF sampled T={temperature}", "hf", temperature),
            Row("HF prompt lookup", "lookup")]
    if has_base:
        rows += [Row("spec greedy (two-model)", "spec2"), Row(f"spec sampled T={temperature} (two-model)", "spec2",
                                                               temperature)]
    if supports_fused(model):
        rows += [Row("spec greedy (fused)", "fused"),
                 Row(f"spec sampled T={temperature} (fused)", "fused", temperature),
                 Row("spec greedy (fused, every length)", "fused_all"),
                 Row(f"spec sampled T={temperature} (fused, every length)", "fused_all", temperature)]
    rows.append(Row("native threshold 0.9", "native"))
    return [row for row in rows if row.kind not in skip]


def run_one(row: Row, model, base, counter, prompt, n, eos, pad, seed, lookup):
    """``(seconds, new tokens, forwards, verifier forwards, acceptance histogram)`` of one generation."""
    generator = torch.Generator().manual_seed(seed)
    if row.kind in ("hf", "lookup"):
        kw = dict(do_sample=row.temperature > 0, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        if row.temperature > 0:
            kw.update(temperature=row.temperature, top_k=0, top_p=1.0)
        if row.kind == "lookup":
            kw["prompt_lookup_num_tokens"] = lookup
        torch.manual_seed(seed)
        before = counter.calls
        call = timed(lambda: base.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                          dtype=torch.long), **kw))
        new = call.result[0, len(prompt) :].tolist()
        forwards = counter.calls - before
        return call.seconds, new, forwards, forwards, []
    if row.kind == "native":
        call = timed(lambda: model.generate([prompt], max_new_tokens=n, sampler="threshold", tau=0.9, eos_token_id=eos,
                                            generator=generator))
        return call.seconds, call.result.new_tokens(0), call.result.nfe, call.result.nfe, []
    verifier, drafter = (base, model) if row.kind == "spec2" else (model, None)
    if row.kind == "fused_all":
        verifier = FusedBlockDiffusion(model, every_length=True)
    call = timed(lambda: speculative_generate(verifier, drafter, prompt, max_new_tokens=n, temperature=row.temperature,
                                              eos_token_id=eos, generator=generator))
    out = call.result
    return call.seconds, out.new_tokens(0), out.nfe, out.verifier_forwards, out.acceptance_histogram


def summarise(rows: list[Row], judge) -> list[dict]:
    ref = rows[0]
    greedy = {i: new for i, _, new in ref.samples}
    hf = {row.temperature: row for row in rows if row.kind == "hf"}  # each row is compared with HF at its temperature
    scorer = causal_lm_logits(judge)
    context = getattr(judge.config, "max_position_embeddings", None)
    out = []
    for row in rows:
        tps = [k / t for k, t in zip(row.tokens, row.times)]
        same = hf.get(row.temperature, ref)
        ref_tps = [k / t for k, t in zip(same.tokens, same.times)]
        nll = [continuation_nll(scorer, p, c, context=context) for _, p, c in row.samples]
        new = sum(len(c) for _, _, c in row.samples)
        out.append(dict(
            name=row.name, kind=row.kind, temperature=row.temperature,
            tokens_per_s=statistics.median(tps), x_hf=same_round_ratio(tps, ref_tps),
            tokens_per_forward=new / max(1, sum(row.verifier_forwards)),
            forwards_per_sample=statistics.mean(row.forwards),
            exact_match=statistics.mean(float(c == greedy[i]) for i, _, c in row.samples),
            acceptance_histogram=row.hist,
            judge_nll=sum(s for s, _ in nll) / max(1, sum(k for _, k in nll)),
            entropy_bits=statistics.mean(unigram_entropy(c, base=2) for _, _, c in row.samples),
            times_s=row.times, tokens=row.tokens,
        ))
    return out


def run(args, console: Console) -> dict:
    torch.set_num_threads(args.threads)
    whole = Stopwatch()
    model, base, judge, tok, cfg, base_name = load(args)
    has_base = args.base is not None or cfg.model.pretrained is not None  # a separate verifier for the two-model rows
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and args.prompt_tokens + args.new_tokens > positions:
        raise SystemExit(
            f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the base's {positions} "
            "positions: speculative decoding stops there while HF generate() runs on; shorten them"
        )
    prompts = heldout_prompts(cfg, tok, args.num_prompts, args.prompt_tokens)
    rows = rows_for(model, has_base, args.temperature, set(args.skip or []))
    counter = CountForwards(base)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():
        warm_up([lambda row=row: run_one(row, model, base, counter, prompts[0], WARMUP_TOKENS, eos, pad, args.seed,
                                         args.lookup) for row in rows])
        for rnd, order in rotations(rows, args.rounds):
            for row in order:
                seconds, tokens = 0.0, 0
                for i, prompt in enumerate(prompts):
                    s, new, fwd, vfwd, hist = run_one(row, model, base, counter, prompt, args.new_tokens, eos, pad,
                                                      args.seed + 1000 * rnd + i, args.lookup)
                    seconds, tokens = seconds + s, tokens + len(new)
                    row.forwards.append(fwd)
                    row.verifier_forwards.append(vfwd)
                    row.hist += [0] * (len(hist) - len(row.hist))
                    row.hist = [a + (hist[j] if j < len(hist) else 0) for j, a in enumerate(row.hist)]
                    row.samples.append((i, prompt, new))
                row.times.append(seconds)
                row.tokens.append(tokens)
            console.log(f"round {rnd + 1}/{args.rounds} done")
        results = summarise(rows, judge)
    notes = [
        f"prompts: {len(prompts)} held-out windows of the corpus (first {args.prompt_tokens} tokens each); "
        f"up to {args.new_tokens} new tokens, EOS stops; batch 1, fp32, {args.rounds} rounds",
        f"verifier / judge: {base_name}; sampled rows: temperature {args.temperature}, no top-k / top-p",
    ]
    if args.note:
        notes.append(args.note)
    return dict(
        environment=_timing.environment(), model=str(args.model), base=base_name, block_length=model.block_length,
        new_tokens=args.new_tokens, rounds=args.rounds, wall_s=whole.elapsed(), notes=notes,
        results=results,
    )


COLUMNS = ["row", "tok/s", "x HF same T", "tok/fwd", "forwards", "exact", "accept hist", "judge NLL", "entropy"]


def table_rows(report: dict) -> list[list[str]]:
    return [
        [r["name"], f"{r['tokens_per_s']:.1f}", f"{r['x_hf']:.2f}", f"{r['tokens_per_forward']:.2f}",
         f"{r['forwards_per_sample']:.1f}", f"{r['exact_match']:.0%}",
         " ".join(map(str, r["acceptance_histogram"])) or "-", f"{r['judge_nll']:.3f}", f"{r['entropy_bits']:.2f}"]
        for r in report["results"]
    ]


def header(report: dict) -> str:
    return "\n".join([
        _timing.header(report["environment"]),
        f"model {report['model']} (block length {report['block_length']}); whole run {report['wall_s'] / 60:.1f} min",
        *report["notes"],
    ])


FOOTER = (
    "tok/s: new tokens / wall time per round (median); x HF same T: median of same-round ratios to HF generate() at "
    "the row's temperature (greedy rows: HF greedy; sampled rows: HF sampled). tok/fwd: new tokens "
    "per verifier forward (accepted + 1); forwards: all network forwards per sample; exact: continuation == HF "
    "greedy's; accept hist: steps keeping 0, 1, ... drafts; judge NLL: nats/token under the base decoder; entropy: "
    "unigram bits."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a blockdiff run or model directory")
    parser.add_argument("--base", help="the verifier / judge decoder (default: model.pretrained of its train config)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens of the HF prompt-lookup row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", action="append", choices=["lookup", "spec2", "fused", "fused_all", "native"],
                        help="leave out the rows of this kind (repeatable)")
    parser.add_argument("--note", help="a line added to the report (e.g. 'untrained adapter: speed means nothing')")
    parser.add_argument("--out-dir", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    console = Console(width=max(Console().width, 150))
    report = run(args, console)
    rows = table_rows(report)
    print_report(console, "Speculative block decoding vs HF generate()", COLUMNS, rows, header(report), FOOTER, "row")
    write_report(args.out_dir, report, header(report) + "\n" + FOOTER, COLUMNS, rows)
    console.print(f"wrote {args.out_dir / 'results.json'} and {args.out_dir / 'table.md'}")


if __name__ == "__main__":
    main()
