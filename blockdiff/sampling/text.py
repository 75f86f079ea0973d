"""Text in, text out: tokenise prompts, run ``generate``, decode and cut at EOS."""

from __future__ import annotations

import torch

from blockdiff.sampling.generation import GenerationOutput, generate

__all__ = ["sample_texts"]


def sample_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    steps_per_block: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[list[str], list[GenerationOutput]]:
    """Continue each prompt (BOS is prepended); returns the continuations (without the prompt) and raw outputs."""
    if not prompts:
        raise ValueError("no prompts given")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, outputs = [], []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
        prompt_ids = torch.tensor([ids], device=device)  # (1, p)
        out = generate(model, prompt_ids, max_new_tokens, steps_per_block, temperature, generator)
        new = out.sequences[0, len(ids) :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        outputs.append(out)
    return texts, outputs
