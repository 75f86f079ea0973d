"""The one step protocol of speculative decoding: what the loop (``loop.py``) sees of whatever drafts and verifies
(docs/design.md §14).

A drafter is a small ``@dataclass`` deriving from ``Drafter``, registered with ``registry.register_drafter``. Its
fields made with ``knob(default, doc)`` are its settings (generation-config fields, ``blockdiff sample`` flags,
server request fields); ``check_knobs`` holds their checks, ``fits`` says whether ``drafter=None`` picks it for the
models given, and ``from_config`` builds it. Each step the loop calls ``propose`` (the drafts), ``score`` (the
verifier's logits after each prefix of them) and ``commit`` (what was kept); counts are read at the end.

Shape legend: ``k`` drafts, ``v`` the verifier's vocabulary.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import knob
from blockdiff.sampling.speculative.settings import Sampling

__all__ = ["Draft", "Drafter", "knob"]


@dataclass
class Draft:
    """Proposed tokens (k,) and, when sampling, the distributions (k, v) they were drawn from (``None``:
    deterministic drafts, treated as one-hot)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None


class Drafter:
    """Base of every drafter: one verification step as the loop sees it (module docstring)."""

    name: ClassVar[str]
    needs_verifier: ClassVar[bool] = True  # built with a separate AR verifier (False: the model verifies itself)
    needs_block_model: ClassVar[bool] = True  # drafts with a BlockDiffusionLM (False: e.g. n-gram lookup)
    verifier_forwards: int  # forwards that verified (the fused step: every forward)
    drafter_forwards: int  # forwards that only drafted
    processed: int  # input tokens over all forwards of both roles
    max_cache: int  # the verifier's largest cache

    @classmethod
    def fits(cls, model, verifier) -> bool:
        """Whether ``drafter=None`` picks this drafter for ``model`` (a block diffuser) and ``verifier`` (``None``:
        none given)."""
        return False

    @classmethod
    def accepts(cls, model) -> bool:
        """Whether ``model``, passed as ``speculative_generate``'s drafter argument, is this drafter's own kind of
        network (a DFlash network for ``dflash``); block diffusers and proposers are recognised by the loop itself."""
        return False

    @classmethod
    def from_config(cls, model, config, verifier=None) -> "Drafter":
        """The drafter for ``model`` and ``verifier`` with its knobs read from ``config``."""
        raise NotImplementedError

    @classmethod
    def knob_values(cls, config) -> dict:
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if "knob" in f.metadata}

    @classmethod
    def check_knobs(cls, config) -> None:
        """Each knob of ``config`` has its field's type (``None`` where the field allows it); override to add more."""
        hints = typing.get_type_hints(cls)
        for name, value in cls.knob_values(config).items():
            kinds = typing.get_args(hints[name]) or (hints[name],)
            if value is None and type(None) in kinds:
                continue
            ok = any(isinstance(value, k) and (k is bool or not isinstance(value, bool)) for k in kinds if k is not
                     type(None))
            if not ok:
                raise UsageError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r} "
                                 f"({cls.name} drafter)")

    @property
    def verifier_model(self):
        """The plain causal LM whose output this is (its generation config gives the default EOS)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """The verifier's vocabulary: every distribution lives on it."""
        raise NotImplementedError

    @property
    def block_model(self):
        """The ``BlockDiffusionLM`` that drafts (``None``: a drafter that is none)."""
        return None

    def reset(self) -> None:
        """Forget everything (a new prompt follows)."""
        raise NotImplementedError

    def propose(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        """At most ``limit`` (>= 0) drafts to follow ``committed``, with their ``q`` when sampling."""
        raise NotImplementedError

    def score(self, committed: list[int], drafts: torch.Tensor) -> torch.Tensor:
        """The verifier's logits ``(k + 1, v)`` after ``committed + drafts[:i]``, ``i = 0 .. k``."""
        raise NotImplementedError

    def commit(self, committed: list[int], accepted: int) -> None:
        """``committed`` now ends with ``accepted`` drafts plus the verifier's token: drop everything else."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """This drafter's own step counts since ``reset`` (``SpeculativeOutput.drafter_counts``; e.g. ``hybrid``'s
        ``lookup_steps`` and tree steps); none by default."""
        return {}
