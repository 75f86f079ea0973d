"""The sampler registry: every sampler by name, and every generation setting derived from it (docs/design.md §9).

A sampler is one file holding one ``Sampler`` dataclass (``base.py``) and one ``@register_sampler`` line. From
the registry come

* ``make_sampler(config, schedule)``: the sampler ``config.sampler`` names, its knobs read from ``config``;
* the block-diffusion fields of ``BlockDiffusionGenerationConfig`` (``settings()``: the ``GENERAL`` ones plus every
  sampler's knobs) and its checks (every registered sampler is built from the config, so each knob is checked
  by the sampler that owns it);
* the ``blockdiff sample`` flags (``knobs()``: name, default, type and doc of each knob), the sweep's
  ``sample.grid`` keys (``WithKnobs``) and the run config's ``sample.sampler`` check (installed into
  ``blockdiff.config``, a leaf that imports nothing of sampling).

Everything is read from the registry when it is used, so a sampler registered later (a plugin, a test's
throwaway one: ``with registered(MySampler): ...``) is reachable from ``model.generate``, the CLI and sweeps
without touching any other file. A knob name may be shared by samplers only with the same default.

A *rule* (``register_rule``) is a dataclass with knobs that applies with every sampler instead of being one: the
adaptive stop (``adaptive_stop.py``). Its knobs join ``knobs()`` after the samplers' (so they are config fields,
flags, sweep keys and server fields like theirs) and its checks run in ``check_knobs``; the block loop builds it.

The built-in samplers are imported by the package (``samplers/__init__.py``), in the order their names are listed;
this module imports none of them, so the registry and the samplers do not import each other.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from transformers import GenerationConfig

from blockdiff import config as run_config
from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import Sampler, knob

__all__ = [
    "Sampler", "knob", "GENERAL", "Knob", "WithKnobs", "register_sampler", "unregister_sampler", "registered",
    "sampler_names", "sampler_class", "knobs", "knobs_of", "settings", "make_sampler", "check_knobs", "Family",
    "register_rule", "make_rule",
    "add_settings_family", "all_knobs", "knobs_of_class", "check_new_knobs", "Registry",
]

# Block-diffusion generation settings no sampler owns: name -> default (the comment is the doc). The sampler
# knobs come between the first two and the rest (so settings() keeps the order the config has always had).
GENERAL = {
    "sampler": "threshold",  # one of sampler_names()
    "steps_per_block": None,  # denoising-step budget per block (default: block_length)
    "window": None,  # sliding-window size in tokens (default: the training context); must be >= 2 blocks
    "use_cache": True,  # block KV cache over finished blocks (False recomputes the whole prefix)
    "reuse_predictions": True,  # skip the forward when no token of the block changed
    "block_beams": 1,  # block beam search: candidate blocks drawn per kept beam at every block (beams.py)
    "beam_width": 1,  # block beam search: beams kept after scoring each block (the k best)
    "beam_score_draws": 2,  # block beam search without an AR scorer: noise draws of each candidate's block NELBO
    "seed": None,  # seed for a fresh generator when none is passed
}
_HEAD = ("sampler", "steps_per_block")
_TRANSFORMERS_FIELDS = frozenset(vars(GenerationConfig()))



@dataclass(frozen=True)
class Knob:
    """One sampler setting as the CLI and the config see it."""

    name: str  # the generation-config field (flag: --name-with-dashes)
    default: Any
    type: type  # what a flag's text is parsed as (int, float, str, bool)
    doc: str  # one line
    sampler: str  # the first registered sampler (or drafter) that owns it
    family: str = "sampler"  # whose setting it is: "sampler", or "drafter" (speculative/registry.py)


def knobs_of_class(cls, family: str = "sampler") -> list[Knob]:
    """The ``knob`` fields of the dataclass ``cls`` (a sampler, or a drafter), in field order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{family} {cls.__name__} must be a @dataclass (its knob fields are its settings)")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "knob" not in f.metadata:
            continue
        kind = hints.get(f.name, str)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out.append(Knob(f.name, f.default, kind, f.metadata["knob"], cls.name, family))
    return out


def check_new_knobs(cls, family: str, known: dict[str, Knob]) -> None:
    """Refuse a ``family`` class (sampler or drafter) whose knob would shadow a generation setting, or share a knob
    name of ``known`` with another default."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{family} {cls.__name__} needs a class attribute name = '<identifier>', got {name!r}")
    reserved = {*GENERAL, *_TRANSFORMERS_FIELDS, *(k for family in _FAMILIES for k in family.general)}
    for k in knobs_of_class(cls, family):
        if k.name in reserved:
            raise ValueError(f"{family} {name!r}: knob {k.name!r} would shadow the generation setting of that name")
        if k.name in known and known[k.name].default != k.default:
            raise ValueError(
                f"{family} {name!r}: knob {k.name!r} is also {known[k.name].sampler!r}'s, with another default "
                f"({known[k.name].default!r}); a shared knob needs the same default"
            )


@dataclass(frozen=True)
class Family:
    """Another registry's generation settings (the drafters': ``speculative/registry.py`` adds itself)."""

    general: dict[str, Any]  # its settings no registered class owns: name -> default
    knobs: Callable[[], dict[str, Knob]]  # its registered classes' knobs, read at each use
    check: Callable[[Any], None]  # its checks of a generation config


_FAMILIES: list[Family] = []


def add_settings_family(family: Family) -> None:
    """Make ``family``'s settings generation-config fields (``settings()``), checked with the sampler knobs."""
    _FAMILIES.append(family)


def all_knobs() -> dict[str, Knob]:
    """Every registered knob: the samplers' (``knobs()``), then the other families' (the drafters')."""
    out = dict(knobs())
    for family in _FAMILIES:
        for name, k in family.knobs().items():
            out.setdefault(name, k)
    return out


class Registry:
    """Classes by name, in registration order: each a dataclass whose ``knob`` fields are its settings. One holds
    the samplers (below), one the drafters (``speculative/registry.py``)."""

    def __init__(self, family: str):
        self.family = family  # "sampler" or "drafter": the word in messages, CLI help and ``Knob.family``
        self.classes: dict[str, type] = {}

    def register(self, cls):
        """Add ``cls`` (its knobs checked against every generation setting and this family's knobs)."""
        check_new_knobs(cls, self.family, self.knobs())
        if cls.name in self.classes:
            raise ValueError(f"a {self.family} named {cls.name!r} is already registered "
                             f"({self.classes[cls.name].__name__})")
        self.classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        del self.classes[name]

    @contextlib.contextmanager
    def registered(self, cls):
        self.register(cls)
        try:
            yield cls
        finally:
            self.unregister(cls.name)

    def names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def get(self, name: str):
        """The class ``name``; an unknown name is a ``UsageError`` listing the known ones."""
        if name not in self.classes:
            raise UsageError(f"{self.family} must be one of {self.names()}, got {name!r}")
        return self.classes[name]

    def knobs(self) -> dict[str, Knob]:
        """Every registered class's knobs, by name (a shared knob once, under its first class)."""
        out: dict[str, Knob] = {}
        for cls in self.classes.values():
            for k in knobs_of_class(cls, self.family):
                out.setdefault(k.name, k)
        return out


_SAMPLERS = Registry("sampler")  # the samplers, in registration order
_RULES = Registry("rule")  # the rules that apply with any sampler (the adaptive stop), in registration order


def register_rule(cls):
    """Class decorator: make the knobs of the rule ``cls`` (a dataclass with ``knob`` fields, a ``name`` and a
    ``from_config(config, schedule)``) generation settings, checked with the samplers' (``check_knobs``)."""
    check_new_knobs(cls, "rule", knobs())
    return _RULES.register(cls)


def make_rule(name: str, config):
    """The registered rule ``name`` built from ``config`` (its knobs checked)."""
    return _RULES.get(name).from_config(config)


def register_sampler(cls):
    """Class decorator: make the ``Sampler`` dataclass ``cls`` reachable as ``sampler=cls.name`` everywhere."""
    return _SAMPLERS.register(cls)


def unregister_sampler(name: str) -> None:
    """Forget the sampler ``name`` (tests; a plugin being unloaded)."""
    _SAMPLERS.unregister(name)


def registered(cls):
    """``with registered(MySampler): ...``: ``MySampler`` is registered inside the block only."""
    return _SAMPLERS.registered(cls)


def sampler_names() -> tuple[str, ...]:
    return _SAMPLERS.names()


def sampler_class(name: str):
    """The registered sampler class ``name``; an unknown name is a ``UsageError`` listing the known ones."""
    return _SAMPLERS.get(name)


def knobs_of(name: str) -> list[str]:
    """The knob names of the registered sampler ``name`` (what a trace records of its settings)."""
    return [k.name for k in knobs_of_class(sampler_class(name))]


def knobs() -> dict[str, Knob]:
    """Every registered sampler's knobs, by name (a shared knob once, under its first sampler), then every rule's."""
    out = _SAMPLERS.knobs()
    for name, k in _RULES.knobs().items():
        out.setdefault(name, k)
    return out


def settings() -> dict[str, Any]:
    """Every block-diffusion generation setting and its default: ``GENERAL`` with the sampler knobs, then each other
    family's settings (speculative decoding's ``drafter`` and the drafter knobs)."""
    head = {k: GENERAL[k] for k in _HEAD}
    tail = {k: v for k, v in GENERAL.items() if k not in _HEAD}
    out = {**head, **{k.name: k.default for k in knobs().values()}, **tail}
    for family in _FAMILIES:
        out.update({**family.general, **{k.name: k.default for k in family.knobs().values() if k.name not in out}})
    return out


def make_sampler(config, schedule=None):
    """The sampler named by ``config.sampler``, its knobs read from ``config``; ``schedule`` is the noise schedule
    the model was trained with (the ancestral sampler's reveal probabilities follow its alpha(t); default
    log-linear)."""
    return sampler_class(config.sampler).from_config(config, schedule)


def check_knobs(config, schedule=None) -> None:
    """Run every sampler's own checks on ``config``: the chosen sampler first, then each other one, so that a
    knob is valid whichever sampler is picked later (the settings are saved with the model)."""
    make_sampler(config, schedule)
    for name, cls in _SAMPLERS.classes.items():
        if name != config.sampler:
            cls.from_config(config, schedule)
    for cls in _RULES.classes.values():  # the rules' own checks of their knobs
        cls.from_config(config, schedule)
    for family in _FAMILIES:  # the drafters' own checks of their knobs
        family.check(config)


class WithKnobs(collections.abc.Sequence):
    """``names`` followed by every registered knob, read afresh at each use (``SAMPLE_KEYS`` of sweeps)."""

    def __init__(self, *names: str):
        self.names = names

    def _all(self) -> tuple[str, ...]:
        return (*self.names, *(k for k in knobs() if k not in self.names))

    def __getitem__(self, index):
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name) -> bool:
        return name in self._all()

    def __repr__(self) -> str:
        return repr(self._all())


run_config.set_sampler_names(sampler_names)  # the run config's sample.sampler check (the config package stays a leaf)
