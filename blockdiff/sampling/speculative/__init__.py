"""Lossless speculative decoding: the AR decoder verifies what a drafter proposes (docs/design.md §14). The loop
(``loop.py``) sees one step protocol (``base.Drafter``); drafters are chosen by name from their registry
(``registry.py``): ``fused`` (``fused.py``: one forward verifies and drafts), ``two_model`` (``drafters.py``: a
separate verifier, ``verify.py``), ``lookup`` (``lookup.py``: n-gram drafts from the text so far, no drafting
network), ``dflash`` (``dflash.py``: a small block-diffusion network reading the verifier's states) and ``hybrid``
(``hybrid.py``: lookup where it matches, dflash elsewhere; with ``hybrid_tree``, both checked as a greedy 2-branch
tree in one verifier forward, ``tree.py``). ``settings.py``: the sampling both models share.
Importing this package registers the built-in drafters, in this order (``drafter_names()``); each imports the
registry, never the other way round."""

from blockdiff.sampling.speculative.base import Draft, Drafter
from blockdiff.sampling.speculative.registry import (
    drafter_names,
    make_drafter,
    register_drafter,
    registered_drafter,
    unregister_drafter,
)

# isort: off
from blockdiff.sampling.speculative.fused import FusedBlockDiffusion, supports_fused
from blockdiff.sampling.speculative.drafters import BlockDrafter, Proposer, TwoModels, Verified
from blockdiff.sampling.speculative.lookup import Lookup, NgramProposer
from blockdiff.sampling.speculative.dflash import DFlash, DFlashProposer
from blockdiff.sampling.speculative.hybrid import Hybrid, HybridProposer
# isort: on
from blockdiff.sampling.speculative.loop import SpeculativeOutput, SpeculativeStep, check_verifier, speculative_generate
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.verify import CausalLMVerifier

__all__ = [
    "speculative_generate", "SpeculativeOutput", "SpeculativeStep", "check_verifier", "Drafter", "Draft", "Proposer",
    "BlockDrafter", "CausalLMVerifier", "Sampling", "TwoModels", "Verified", "Lookup", "NgramProposer",
    "DFlash", "DFlashProposer", "Hybrid", "HybridProposer",
    "FusedBlockDiffusion", "supports_fused",
    "register_drafter", "registered_drafter", "unregister_drafter", "drafter_names", "make_drafter",
]
