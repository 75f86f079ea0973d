"""Benchmark: every drafter of lossless speculative decoding vs the decoder's own Hugging Face ``generate()``.

One process, batch 1, fp32, ``--threads`` threads, ``OMP_WAIT_POLICY=PASSIVE`` (``_timing``), round-robin rounds.
Every row writes ``--new-tokens`` tokens after each prompt (stopping at EOS as ``generate`` does). Greedy rows:

* ``HF generate``: ``generate(do_sample=False)`` on the plain model (MKL kernels): the reference of every ratio;
* ``HF prompt lookup``: ``generate(prompt_lookup_num_tokens=10)`` as a user runs it, and on the packed model (the
  same kernels as ours: the fair row);
* ``lookup`` / ``dflash`` / ``hybrid``: ``speculative_generate(model, None, ids, drafter=...)`` on the packed model
  (``lean.pack_linears``), the DFlash drafter from ``--drafter`` (default: the one shipped for the model);
  ``hybrid tree`` is ``hybrid`` with ``hybrid_tree=True`` (lookup and DFlash drafts checked as a 2-branch tree);
  ``--hybrid-threshold`` sets the hybrid rows' cut (default: the knob's default);
  ``dflash, unpacked`` is the same algorithm on MKL kernels (what the kernel buys);
* ``dflash package``: the ``dflash`` package's own ``dflash_generate`` with the same drafter folder (its layout) on
  the packed model: its loop, its full-vocabulary drafts.

Sampled rows (``--temperature``, default 0.8): ``HF sampling`` (``do_sample=True``, the reference at that
temperature), ``lookup`` / ``dflash`` / ``hybrid`` sampling. Their outputs differ from HF's by construction (the
distribution is the same: tests/test_dflash.py, tests/test_speculative.py), so **exact** is reported for greedy only.

Prompts: ``--num-prompts`` windows of the held-out tail of the ``shakespeare`` corpus (never distilled, never trained
on) and an out-of-domain set, the opening of standard-library module docstrings (never used for training or tuning).
Columns: **x HF** (median over rounds of the same-round ratio of tokens/s to the reference at the same temperature),
**tok/fwd** (new tokens per verifier forward), **accepted** (histogram of drafts kept per step, 0..), **exact**
(greedy continuations equal to HF's), per-prompt min / max of the speed ratio.

    python experiments/bench_drafters.py                                   # SmolLM2-135M, the shipped drafter
    python experiments/bench_drafters.py --rounds 1 --num-prompts 2 --new-tokens 16 --skip-sampled   # smoke

Results: ``experiments/results/bench_drafters/`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import header, rotations, same_round_ratio, timed, warm_up
from bench_lookup import OOD_MODULES, load, prompt_sets
from rich.console import Console
from transformers.utils import logging as hf_logging

from blockdiff.modeling.dflash import load_drafter, shipped_drafter
from blockdiff.modeling.lean import is_packed, pack_linears
from blockdiff.sampling.speculative import speculative_generate


def hf_row(model, new_tokens, eos, temperature=0.0, **kw):
    def run(ids, seed):
        x = torch.tensor([ids])
        torch.manual_seed(seed)
        sample = dict(do_sample=True, temperature=temperature, top_k=0) if temperature else dict(do_sample=False)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, pad_token_id=eos,
                             **sample, **kw)
        return out[0, len(ids):].tolist(), None, None
    return run


def ours_row(model, drafter, new_tokens, eos, path, temperature=0.0, **knobs):
    network = load_drafter(path, model, lean=is_packed(model)) if drafter in ("dflash", "hybrid") else None

    def run(ids, seed):
        out = speculative_generate(model, network, ids, drafter=drafter, max_new_tokens=new_tokens, eos_token_id=eos,
                                   temperature=temperature, generator=torch.Generator().manual_seed(seed), **knobs)
        return out.new_tokens(0), out.verifier_forwards, out.acceptance_histogram
    return run


def package_row(model, path, new_tokens, eos):
    from dflash.model import DFlashDraftModel, dflash_generate

    ref = DFlashDraftModel.from_pretrained(path, dtype=torch.float32).eval()
    pack_linears(ref)

    def run(ids, seed):
        out = dflash_generate(ref, model, torch.tensor([ids]), new_tokens, [eos], temperature=0.0)
        return out[0, len(ids):].tolist(), None, None
    return run


def rows(plain, packed, path, new_tokens, eos, temperature, sampled: bool, package: bool, hybrid: dict) -> dict:
    """``name -> (fn(ids, seed) -> (new tokens, verifier forwards | None, histogram | None), reference row)``;
    ``hybrid``: the hybrid rows' knobs (e.g. ``hybrid_threshold``)."""
    greedy = "HF generate"
    out = {
        greedy: (hf_row(plain, new_tokens, eos), greedy),
        "HF prompt lookup": (hf_row(plain, new_tokens, eos, prompt_lookup_num_tokens=10), greedy),
        "HF prompt lookup, packed": (hf_row(packed, new_tokens, eos, prompt_lookup_num_tokens=10), greedy),
        "lookup, packed": (ours_row(packed, "lookup", new_tokens, eos, path), greedy),
        "dflash, unpacked": (ours_row(plain, "dflash", new_tokens, eos, path), greedy),
        "dflash, packed": (ours_row(packed, "dflash", new_tokens, eos, path), greedy),
        "hybrid, packed": (ours_row(packed, "hybrid", new_tokens, eos, path, **hybrid), greedy),
        "hybrid tree, packed": (ours_row(packed, "hybrid", new_tokens, eos, path, hybrid_tree=True, **hybrid), greedy),
    }
    if package:
        out["dflash package, packed"] = (package_row(packed, path, new_tokens, eos), greedy)
    if sampled:
        t, ref = temperature, f"HF sampling T={temperature}"
        out[ref] = (hf_row(plain, new_tokens, eos, temperature=t), ref)
        for name in ("lookup", "dflash", "hybrid"):
            knobs = hybrid if name == "hybrid" else {}
            out[f"{name} T={t}, packed"] = (ours_row(packed, name, new_tokens, eos, path, temperature=t, **knobs), ref)
    return out


def bench(fns: dict, prompts: list[list[int]], rounds: int) -> dict:
    """Per row: seconds[round][prompt] and the last round's outputs (seed = prompt index: the same draws each round)."""
    warm_up([lambda f=f: f(prompts[0][:8], 0) for f, _ in fns.values()])
    seconds = {name: [[0.0] * len(prompts) for _ in range(rounds)] for name in fns}
    outputs = {name: [None] * len(prompts) for name in fns}
    for r, order in rotations(list(fns), rounds):
        for name in order:
            for i, ids in enumerate(prompts):
                t = timed(lambda f=fns[name][0], ids=ids, i=i: f(ids, i))
                seconds[name][r][i] = t.seconds
                outputs[name][i] = t.result
    return {"seconds": seconds, "outputs": outputs}


def summarise(fns: dict, result: dict, rounds: int) -> list[dict]:
    summary = []
    greedy_out = result["outputs"]["HF generate"]
    for name, per_round in result["seconds"].items():
        ref_name = fns[name][1]
        ref = result["seconds"][ref_name]
        outs = result["outputs"][name]
        tokens = [len(o[0]) for o in outs]
        ref_tokens = [len(o[0]) for o in result["outputs"][ref_name]]
        rate = [sum(tokens) / sum(per_round[r]) for r in range(rounds)]  # tokens/s (sampled rows stop differently)
        ref_rate = [sum(ref_tokens) / sum(ref[r]) for r in range(rounds)]
        per_prompt = [statistics.median((tokens[i] / per_round[r][i]) / (ref_tokens[i] / ref[r][i])
                                        for r in range(rounds)) for i in range(len(outs))]
        forwards = [o[1] for o in outs]
        hist: list[int] = []
        for o in outs:
            for a, c in enumerate(o[2] or []):
                hist += [0] * (a + 1 - len(hist))
                hist[a] += c
        summary.append(dict(
            row=name, reference=ref_name, tok_s=statistics.median(rate), x_hf=same_round_ratio(rate, ref_rate),
            tok_fwd=None if None in forwards else sum(tokens) / max(1, sum(forwards)), accepted=hist,
            exact=(sum(o[0] == g[0] for o, g in zip(outs, greedy_out)) / len(outs)) if "T=" not in name else None,
            min_x=min(per_prompt), max_x=max(per_prompt),
        ))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a decoder (smollm2, a hub id or a directory)")
    p.add_argument("--drafter", default=None, help="a DFlash drafter folder (default: the one shipped for --model)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--skip-sampled", action="store_true", help="greedy rows only")
    p.add_argument("--skip-package", action="store_true", help="no row for the dflash package")
    p.add_argument("--hybrid-threshold", type=float, default=None,
                   help="hybrid_threshold of the hybrid rows (default: the knob's default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ood-modules", default=OOD_MODULES, help="standard-library modules whose docstrings are prompts")
    p.add_argument("--out", default=str(results_dir(__file__)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    plain, tokenizer = load(args.model)
    path = args.drafter or str(shipped_drafter(plain))
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    hybrid = {} if args.hybrid_threshold is None else {"hybrid_threshold": args.hybrid_threshold}
    fns = rows(plain, packed, path, args.new_tokens, tokenizer.eos_token_id, args.temperature, not args.skip_sampled,
               not args.skip_package, hybrid)
    report, table = dict(settings=vars(args), drafter=path, sets={}), []
    for set_name, prompts in prompt_sets(tokenizer, args.num_prompts, args.prompt_tokens, args.ood_modules).items():
        result = bench(fns, prompts, args.rounds)
        summary = summarise(fns, result, args.rounds)
        report["sets"][set_name] = dict(prompts=prompts, seconds=result["seconds"], summary=summary,
                                        outputs={k: [o[0] for o in v] for k, v in result["outputs"].items()})
        for s in summary:
            tok_fwd = "n/a" if s["tok_fwd"] is None else f"{s['tok_fwd']:.2f}"
            exact = "n/a" if s["exact"] is None else f"{s['exact']:.0%}"
            table.append([set_name, s["row"], f"{s['tok_s']:.1f}", f"{s['x_hf']:.2f}", tok_fwd,
                          " ".join(map(str, s["accepted"])) or "-", exact, f"{s['min_x']:.2f} / {s['max_x']:.2f}"])
    env = _timing.environment()
    report["environment"] = env
    columns = ["prompts", "row", "tok/s", "x HF", "tok/fwd", "accepted 0,1,..", "exact", "per-prompt min / max x"]
    footer = ("x HF: median over rounds of the same-round ratio of tokens/s to HF at the same temperature; tok/fwd: "
              "new tokens per verifier forward (n/a: not reported by HF / the dflash package); accepted: steps that "
              "kept 0, 1, ... drafts; exact: greedy continuations equal to HF generate()'s")
    write_report(args.out, report, header(env) + "\n" + footer, columns, table)
    print_report(Console(), "drafters vs HF generate()", columns, table, header(env), footer, "row")


if __name__ == "__main__":
    main()
