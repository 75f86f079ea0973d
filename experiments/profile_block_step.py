"""Where a block-diffusion forward's time goes on SmolLM2-135M: decoder body, output head, token choice, mask.

    PYTHONPATH=<tree> python experiments/profile_block_step.py

Wraps ``model.hidden_states``, ``model.logits``, ``model.sampling_mask`` and the block loop's token choice
(``choose_tokens`` in older trees, ``choose_rows`` now) with ``_timing.Stopwatch`` and generates with the
threshold sampler (tau 0.9) at L'=4 and 16, batch 1 and 8, greedy and at temperature 0.8; prints milliseconds per
forward after the environment header (``OMP_WAIT_POLICY=PASSIVE`` unless given, ``_timing.py``). Runs under any
source tree (``PYTHONPATH``), so the same script profiles before and after a change.
"""

from __future__ import annotations

import collections

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _timing import Stopwatch, timed

import blockdiff.sampling.generation as generation
from blockdiff import BlockDiffusionLM, BlockDiffusionSpec
from blockdiff.modeling.pretrained import load_pretrained


def main() -> None:
    torch.set_num_threads(2)
    print(_timing.header(_timing.environment()), flush=True)
    backbone, tokenizer, _ = load_pretrained("smollm2")
    backbone.eval()
    spent = collections.defaultdict(float)

    def wrap(owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def clocked(*args, **kwargs):
            with Stopwatch() as watch:
                out = inner(*args, **kwargs)
            spent[key] += watch.seconds
            return out

        setattr(owner, name, clocked)

    for name in ("choose_tokens", "choose_rows"):
        if hasattr(generation, name):
            wrap(generation, name, "choose")
    prompt = tokenizer("The history of the city begins", add_special_tokens=False)["input_ids"]
    rng = torch.Generator().manual_seed(0)
    for l in (4, 16):
        model = BlockDiffusionLM(backbone, BlockDiffusionSpec(tokenizer.mask_token_id, l, True, 2048))
        for name, key in (("hidden_states", "body"), ("logits", "head"), ("sampling_mask", "mask")):
            wrap(model, name, key)
        for b in (1, 8):
            prompts = [prompt + torch.randint(0, 1000, (i,), generator=rng).tolist() for i in range(b)]
            for temperature in (0.0, 0.8):
                spent.clear()
                call = timed(lambda: model.generate(prompts, max_new_tokens=2 * l if b == 8 else 4 * l,
                                                    sampler="threshold", tau=0.9, temperature=temperature,
                                                    eos_token_id=None, seed=0))
                total, nfe = call.seconds, call.result.nfe
                parts = " ".join(f"{k} {v / nfe * 1e3:.1f}" for k, v in sorted(spent.items()))
                print(f"L'={l} b={b} T={temperature}: {total / nfe * 1e3:.1f} ms/forward over {nfe} forwards; "
                      f"per forward: {parts}; rest {(total - sum(spent.values())) / nfe * 1e3:.1f}", flush=True)


if __name__ == "__main__":
    main()
