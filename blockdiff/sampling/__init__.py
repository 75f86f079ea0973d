"""Sampling: the block loop (``generation.py``) and text helpers (``text.py``). Never imports Lightning."""

from blockdiff.sampling.generation import GenerationOutput, generate
from blockdiff.sampling.text import sample_texts

__all__ = ["GenerationOutput", "generate", "sample_texts"]
