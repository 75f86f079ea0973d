"""Text in, text out: tokenise prompts (BOS prepended), generate as one batch, decode up to EOS."""

from __future__ import annotations

from blockdiff.errors import UsageError
from blockdiff.sampling.outputs import GenerationOutput

__all__ = ["encode_prompts", "sample_texts"]


def encode_prompts(tokenizer, prompts: str | list[str]) -> list[list[int]]:
    """``[BOS] + tokens`` per prompt (a single string is one prompt); special-token *text* in a prompt stays text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise UsageError("prompts must be a string or a list of strings")
    if not prompts:
        raise UsageError("no prompts given")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = tokenizer(list(prompts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = [bos + list(e) for e in encoded]
    if any(not p for p in ids):
        raise UsageError("an empty prompt needs a tokenizer with a BOS token")
    return ids


def sample_texts(
    model, tokenizer, prompts: str | list[str], generator=None, observer=None, **settings
) -> tuple[list[str], GenerationOutput]:
    """Continue every prompt in one ragged batch; returns the continuations (prompt excluded) and the output.

    ``prompts``: a list of strings, or one string (one prompt). ``settings`` are generation overrides
    (``max_new_tokens``, ``sampler``, ``tau``, ``temperature``, ``stop_strings``, ...). With
    ``num_return_sequences=n`` there are ``n`` texts per prompt, those of the first prompt first.
    """
    settings.setdefault("eos_token_id", tokenizer.eos_token_id)
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    ids = encode_prompts(tokenizer, prompts)
    out = model.generate(ids, generator=generator, observer=observer, tokenizer=tokenizer, **settings)
    texts = [tokenizer.decode(out.new_tokens(i), skip_special_tokens=True) for i in range(len(out.lengths))]
    return texts, out
