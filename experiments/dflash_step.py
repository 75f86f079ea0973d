"""Where a ``dflash`` step's time goes: the drafter's forward, the verifier's forward, and the rest of the loop, each
in units of one HF ``generate()`` decoding step measured in the same round (docs/benchmarks.md, "The dflash step").

Per round: ``bench_drafters``' ``dflash, packed`` row (``speculative_generate(drafter="dflash")`` on the packed SmolLM2
with the shipped drafter) over the prompts, then its ``HF generate`` row (plain, greedy) over the same prompts; the
drafter's ``DFlashProposer.draft`` and the verifier's ``CausalLMVerifier.forward`` are wrapped with a clock. A step's
parts are their seconds per verifier forward divided by HF's seconds per token of that round, so a slow round slows both
sides. Every round is reported (not only the median): the point is how much each part moves from round to round.

    python experiments/dflash_step.py                        # 4 held-out prompts, 64 new tokens, 3 rounds
    python experiments/dflash_step.py --rounds 1 --new-tokens 8   # smoke

Results: ``experiments/results/dflash_step/`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import clock, header, warm_up
from bench_drafters import hf_row, ours_row
from bench_lookup import OOD_MODULES, load, prompt_sets
from rich.console import Console

from blockdiff.modeling.dflash import shipped_drafter
from blockdiff.modeling.lean import pack_linears
from blockdiff.sampling.speculative import dflash as dflash_module
from blockdiff.sampling.speculative import verify as verify_module

SPENT: dict[str, float] = defaultdict(float)


def clocked(cls, method: str, part: str) -> None:
    """Wrap ``cls.method`` so its seconds add up in ``SPENT[part]``."""
    inner = getattr(cls, method)

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[part] += clock() - start
    setattr(cls, method, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--drafter", default=None, help="drafter folder (default: the one shipped for SmolLM2)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plain, tokenizer = load("smollm2")
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    prompts = prompt_sets(tokenizer, 6, 32, OOD_MODULES)["held-out"][: args.num_prompts]
    eos = tokenizer.eos_token_id
    ours = ours_row(packed, "dflash", args.new_tokens, eos, str(args.drafter or shipped_drafter(plain)))
    hf = hf_row(plain, args.new_tokens, eos)  # both: fn(ids, seed) -> (new tokens, verifier forwards | None, _)
    clocked(dflash_module.DFlashProposer, "draft", "draft")
    clocked(verify_module.CausalLMVerifier, "forward", "verify")
    warm_up([lambda: ours(prompts[0][:8], 0), lambda: hf(prompts[0][:8], 0)])
    rounds = []
    for _ in range(args.rounds):
        SPENT.clear()
        start, forwards, tokens = clock(), 0, 0
        for ids in prompts:
            new, used, _ = ours(ids, 0)
            forwards, tokens = forwards + used, tokens + len(new)
        total = clock() - start
        start, hf_tokens = clock(), 0
        for ids in prompts:
            hf_tokens += len(hf(ids, 0)[0])
        hf_step = (clock() - start) / hf_tokens
        rounds.append(dict(
            x_hf=(tokens / total) * hf_step, tokens_per_forward=tokens / forwards, hf_step_ms=1e3 * hf_step,
            verify_ms=1e3 * SPENT["verify"] / forwards, draft_ms=1e3 * SPENT["draft"] / forwards,
            verify_steps=SPENT["verify"] / forwards / hf_step, draft_steps=SPENT["draft"] / forwards / hf_step,
            rest_steps=(total - SPENT["verify"] - SPENT["draft"]) / forwards / hf_step,
        ))
    env = _timing.environment()
    columns = ["round", "x HF", "tok/fwd", "HF step ms", "verify ms", "draft ms", "verify steps", "draft steps",
               "rest steps"]
    keys = ["x_hf", "tokens_per_forward", "hf_step_ms", "verify_ms", "draft_ms", "verify_steps", "draft_steps",
            "rest_steps"]
    rows = [[str(i + 1)] + [f"{r[k]:.2f}" if "ms" not in k else f"{r[k]:.0f}" for k in keys]
            for i, r in enumerate(rounds)]
    out_dir = args.out or results_dir(__file__)
    write_report(out_dir, dict(settings=vars(args), environment=env, rounds=rounds), header(env), columns, rows)
    print_report(Console(), "a dflash step, in HF decoding steps of the same round", columns, rows, header(env),
                 f"results: {out_dir}", "round")


if __name__ == "__main__":
    main()
