"""Block-by-block generation (DESIGN.md §3), uncached reference loop.

Outer loop over blocks, inner denoising loop over the current block. Blocks are aligned to the
training grid (block ``k`` covers absolute positions ``[k l, (k+1) l)``), so a prompt that ends mid-block
simply leaves the rest of its block to be denoised first — the prompt tail plays the part of the
block's unmasked tokens, exactly as in training. Every forward runs the network on
``[finished tokens ; current block]`` under the block-causal mask, which gives the same logits as the
training forward's noisy half (finished blocks are clean, the current block sees itself).

The step rule here is the simple confidence-ordered one: at each of ``steps_per_block`` steps, sample a
token at every masked position and reveal the ``ceil(remaining / steps_left)`` most confident ones.
This module never imports Lightning.

Shape legend: ``b`` batch, ``p`` prompt length, ``s`` tokens so far, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.masks import block_causal_mask

__all__ = ["GenerationOutput", "generate"]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (b, p + max_new_tokens) prompt followed by generated tokens
    nfe: int  # network forward evaluations
    tokens_per_forward: float  # generated tokens per forward


def _block_logits(model, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Logits ``(b, s - start, v)`` predicting positions ``start..s-1`` of ``tokens`` (b, s)."""
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device)  # (s,)
    mask = model.format_mask(block_causal_mask(pos, pos, model.block_length)[None, None])  # (1, 1, s, s)
    hidden, _ = model.hidden_states(tokens, pos[None].expand(b, -1), mask)  # (b, s, d)
    shift = 1 if model.spec.logit_shift else 0
    return model.logits(hidden[:, start - shift : s - shift])


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    steps_per_block: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` after ``prompt_ids`` (b, p), one block at a time."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError("prompt_ids must be a (batch, length>=1) tensor of token ids")
    l, m = model.block_length, model.mask_token_id
    b, p = prompt_ids.shape
    total = p + max_new_tokens
    tokens = prompt_ids
    nfe = 0
    while tokens.shape[1] < total:
        start = tokens.shape[1]
        end = min(total, (start // l + 1) * l)  # the end of the block that position `start` falls in
        tokens = torch.cat([tokens, torch.full((b, end - start), m, device=tokens.device)], dim=1)  # (b, end)
        steps = steps_per_block or l
        for step in range(steps):
            masked = tokens[:, start:] == m  # (b, end-start)
            if not masked.any():
                break
            logits = _block_logits(model, tokens, start)  # (b, end-start, v)
            nfe += 1
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                sampled = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(b, -1)
            else:
                probs = torch.softmax(logits, dim=-1)
                sampled = probs.argmax(-1)
            confidence = probs.gather(-1, sampled[..., None]).squeeze(-1).masked_fill(~masked, -1.0)
            k = math.ceil(masked.sum(1).max().item() / (steps - step))
            top = confidence.topk(min(k, confidence.shape[1]), dim=1).indices  # (b, k)
            reveal = torch.zeros_like(masked).scatter_(1, top, True) & masked
            tokens[:, start:] = torch.where(reveal, sampled, tokens[:, start:])
    return GenerationOutput(sequences=tokens, nfe=nfe, tokens_per_forward=max_new_tokens / max(1, nfe))
