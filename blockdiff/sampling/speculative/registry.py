"""The drafter registry: every way of drafting for speculative decoding, by name (docs/design.md §14).

A drafter is one file holding one ``Drafter`` dataclass (``base.py``: the one step protocol the loop sees) and one
``@register_drafter`` line, as a sampler is (``samplers/registry.py``). Its ``knob`` fields are its settings: they
become generation-config fields (``settings()`` of the sampler registry, to which this registry adds itself), so
``speculative_generate(..., every_length=True)``, the ``blockdiff sample --speculative --drafter NAME`` flags, the
server's request fields and ``blockdiff config keys`` reach every registered drafter with no list kept by hand.
``drafter=None`` (the default) picks the first registered drafter that ``fits`` the models given: ``fused`` for a
block diffuser that verifies itself, ``two_model`` when a separate verifier is given.

The built-in drafters are imported by the package (``speculative/__init__.py``); this module imports none of them.
"""

from __future__ import annotations

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.registry import Family, Registry, add_settings_family

__all__ = [
    "SPECULATIVE", "register_drafter", "unregister_drafter", "registered_drafter", "drafter_names", "drafter_class",
    "drafter_knobs", "check_drafter_knobs", "make_drafter", "needs_verifier", "accepting_drafter",
]

# Speculative-decoding settings no drafter owns: name -> default (the comment is the doc).
SPECULATIVE = {
    "drafter": None,  # one of drafter_names(); None: the first that fits (fused for a self-verifying model)
}

_DRAFTERS = Registry("drafter")  # the drafters, in registration order
register_drafter = _DRAFTERS.register  # class decorator: ``drafter=cls.name`` reaches the dataclass ``cls``
unregister_drafter = _DRAFTERS.unregister  # forget a drafter (tests; a plugin being unloaded)
registered_drafter = _DRAFTERS.registered  # ``with registered_drafter(MyDrafter): ...``: inside the block only
drafter_names = _DRAFTERS.names
drafter_class = _DRAFTERS.get  # an unknown name is a UsageError listing the known ones
drafter_knobs = _DRAFTERS.knobs  # every drafter's knobs, by name (a shared knob once, under its first drafter)


def check_drafter_knobs(config) -> None:
    """``drafter`` names a registered drafter (or is ``None``) and every drafter's knobs pass its own checks."""
    if config.drafter is not None:
        drafter_class(config.drafter)
    for cls in _DRAFTERS.classes.values():
        cls.check_knobs(config)


def accepting_drafter(model, verifier) -> str | None:
    """The first registered drafter that takes ``model`` as its own network and fits it with ``verifier``."""
    return next((n for n, cls in _DRAFTERS.classes.items() if cls.accepts(model) and cls.fits(model, verifier)), None)


def needs_verifier(model, name: str | None) -> bool:
    """Whether the drafter ``name`` (``None``: the one ``make_drafter`` picks when no verifier is given) is built
    with a separate verifier, which the caller then loads."""
    if name is None:
        return not any(cls.fits(model, None) for cls in _DRAFTERS.classes.values())
    return drafter_class(name).needs_verifier


def make_drafter(model, config, verifier=None):
    """The drafter ``config.drafter`` names (``None``: the first registered one that ``fits`` ``model`` and
    ``verifier``), built from ``model`` (a ``BlockDiffusionLM``), ``verifier`` (a plain causal LM or ``None``) and its
    knobs read from ``config``."""
    name = config.drafter
    if name is None:
        name = next((n for n, cls in _DRAFTERS.classes.items() if cls.fits(model, verifier)), None)
        if name is None:
            raise UsageError(
                "no drafter fits this model alone: a model verifies its own drafts (fused) only when trained with "
                "model.clean_attention=causal model.adapter=gated_lora; otherwise pass a verifier (the decoder it was "
                f"fine-tuned from; --base NAME on the command line), or name a drafter: one of {drafter_names()}"
            )
    return drafter_class(name).from_config(model, config, verifier)


add_settings_family(Family(SPECULATIVE, drafter_knobs, check_drafter_knobs))
