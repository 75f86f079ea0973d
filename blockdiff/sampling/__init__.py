"""Sampling: the sampler registry (``registry.py``, one sampler per file), the block loop (``generation.py``) and
text helpers (``text.py``), and lossless speculative decoding against an AR verifier (``speculative.py``).
Never imports Lightning."""

from blockdiff.sampling.generation import GenerationOutput, generate
from blockdiff.sampling.registry import Sampler, knob, register_sampler, registered, sampler_names, unregister_sampler
from blockdiff.sampling.speculative import SpeculativeOutput, speculative_generate
from blockdiff.sampling.text import encode_prompts, sample_texts

__all__ = [
    "GenerationOutput", "generate", "encode_prompts", "sample_texts",
    "SpeculativeOutput", "speculative_generate",
    "Sampler", "knob", "register_sampler", "registered", "sampler_names", "unregister_sampler",
]
