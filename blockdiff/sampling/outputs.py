"""What generation returns and reports: ``GenerationOutput`` (one call's sequences and counts) and ``StepEvent``
(one denoising step, for observers such as traces and live views). Counting is described in ``generation.py``.

Shape legend: ``b`` returned sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GenerationOutput", "StepEvent"]


@dataclass
class GenerationOutput:
    """One row per returned sequence (``num_return_sequences`` rows per prompt, those of prompt 0 first)."""

    sequences: torch.Tensor  # (b, longest) prompt + new tokens, right-padded with pad_token_id
    prompt_lengths: torch.Tensor  # (b,)
    lengths: torch.Tensor  # (b,) new tokens kept per sample (EOS / the stop string's tokens included)
    stopped_at_eos: torch.Tensor  # (b,) bool
    nfe: int  # network forwards of the batch (one forward serves every active sample)
    tokens_processed_per_forward: float  # input tokens (summed over the active batch) per batch forward
    tokens_per_forward: float  # kept new tokens of all samples per batch forward (grows with the batch)
    max_cache_length: int = 0  # largest KV cache (in tokens) held during generation
    sample_nfe: torch.Tensor | None = None  # (b,) forwards that denoised each sample (its cost alone)
    stop_reasons: list[str] | None = None  # per sample: "eos", "stop_string", "max_new_tokens" or "cancelled"
    rewrites: int = 0  # uniform noise: tokens the sampler wrote and later replaced by another (0 under absorbing)

    def new_tokens(self, i: int) -> list[int]:
        """The generated tokens of sample ``i`` (prompt excluded)."""
        start = int(self.prompt_lengths[i])
        return self.sequences[i, start : start + int(self.lengths[i])].tolist()

    @classmethod
    def stack(cls, outputs: list["GenerationOutput"], pad_token_id: int = 0) -> "GenerationOutput":
        """The rows of several calls (each run on its own, e.g. speculative decoding's one prompt per call) as one
        output, in order; ``nfe`` and the caches add up, each row keeps its own forwards (``sample_nfe``: a call's
        own when it has none, ``nfe`` of a one-row call)."""
        rows = [row for out in outputs for row in out.sequences]
        sequences = torch.full((len(rows), max(len(r) for r in rows)), pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            sequences[i, : len(row)] = row
        own = [out.sample_nfe if out.sample_nfe is not None else torch.full((len(out.lengths),), out.nfe)
               for out in outputs]
        nfe = sum(out.nfe for out in outputs)
        lengths = torch.cat([out.lengths for out in outputs])
        return cls(
            sequences=sequences, prompt_lengths=torch.cat([out.prompt_lengths for out in outputs]), lengths=lengths,
            stopped_at_eos=torch.cat([out.stopped_at_eos for out in outputs]), nfe=nfe,
            tokens_processed_per_forward=sum(o.tokens_processed_per_forward * o.nfe for o in outputs) / max(1, nfe),
            tokens_per_forward=float(lengths.sum()) / max(1, nfe),
            max_cache_length=max(out.max_cache_length for out in outputs), sample_nfe=torch.cat(own),
            stop_reasons=[r for out in outputs for r in (out.stop_reasons or [None] * len(out.lengths))],
        )

    @property
    def sample_tokens_per_forward(self) -> float:
        """New tokens per forward per sequence: all kept tokens over all per-sample forwards (1.0 for AR decoding)."""
        return float(self.lengths.sum()) / max(1, int(self.sample_nfe.sum())) if self.sample_nfe is not None else 0.0


@dataclass
class StepEvent:
    """One denoising step, for traces and live displays. Positions are per-sample token positions."""

    block: int  # column block index (blocks of every sample share columns)
    step: int
    samples: list[int]  # original batch indices of the active samples
    block_start: list[int]  # position of the block's first column, per active sample
    tokens: list[list[int]]  # the block after this step (mask id where still masked)
    revealed: list[list[int]]  # positions revealed at this step, per active sample
    remasked: list[list[int]]  # positions re-opened at this step
    confidence: list[list[float]]  # confidence of each revealed token
    forward: bool  # whether this step ran the network (False: prediction reused)
    finished: bool = False  # the block is final (cache write follows)
