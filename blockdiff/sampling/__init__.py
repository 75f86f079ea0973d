"""Sampling, three families (docs/design.md §8, §9, §14): the block loop at the top (``generation.py`` with its
column grid ``grid.py``, inputs, outputs, settings ``config.py``, token choice ``logits.py``, text helpers ``text.py``,
and its two variants ``rewrite.py`` (uniform noise) and ``beams.py`` (block beam search)), the samplers
(``samplers/``: one step rule per file and their registry) and lossless speculative decoding against an AR verifier
(``speculative/``). Never imports Lightning."""

from blockdiff.sampling.generation import GenerationOutput, generate
from blockdiff.sampling.samplers.registry import (
    Sampler,
    knob,
    register_sampler,
    registered,
    sampler_names,
    unregister_sampler,
)
from blockdiff.sampling.speculative import SpeculativeOutput, speculative_generate
from blockdiff.sampling.text import encode_prompts, sample_texts

__all__ = [
    "GenerationOutput", "generate", "encode_prompts", "sample_texts",
    "SpeculativeOutput", "speculative_generate",
    "Sampler", "knob", "register_sampler", "registered", "sampler_names", "unregister_sampler",
]
