"""Sampling: the block loop (``generation.py``) and text helpers (``text.py``). Never imports Lightning."""

from blockdiff.sampling.generation import GenerationOutput, generate
from blockdiff.sampling.text import encode_prompts, sample_texts

__all__ = ["GenerationOutput", "generate", "encode_prompts", "sample_texts"]
