"""Lossless speculative decoding: the AR decoder verifies what a drafter proposes (docs/design.md §14). The loop
(``loop.py``), the drafters (``drafters.py``), the verifier and its acceptance rules (``verify.py``), the fused
one-forward step (``fused.py``) and the sampling settings both models share (``settings.py``)."""

from blockdiff.sampling.speculative.drafters import BlockDrafter, Draft, Drafter
from blockdiff.sampling.speculative.fused import FusedBlockDiffusion, supports_fused
from blockdiff.sampling.speculative.loop import (
    SpeculativeOutput,
    SpeculativeStep,
    Speculator,
    TwoModels,
    check_verifier,
    speculative_generate,
)
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.verify import CausalLMVerifier

__all__ = [
    "speculative_generate", "SpeculativeOutput", "SpeculativeStep", "check_verifier", "Drafter", "Draft",
    "BlockDrafter", "CausalLMVerifier", "Sampling", "Speculator", "TwoModels", "FusedBlockDiffusion", "supports_fused",
]
