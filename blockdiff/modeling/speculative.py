"""Which verifier and which drafter speculative decoding of a path runs with (docs/design.md §14): the one decision
``blockdiff sample --speculative`` and ``blockdiff serve --speculative`` share, so a new kind of drafter that needs
something loaded (a drafter checkpoint next to the verifier) is added here once and reaches both.

```
PATH a plain decoder (not a blockdiff run or model), drafter needs no block diffuser:
    verifier = PATH     drafter: hybrid with the DFlash drafter shipped for PATH when one fits (the default), else
                        lookup; dflash / hybrid load the network from --dflash-path (load_drafter)
PATH a blockdiff run or model (a block diffuser, at --block-length if given):
    drafter verifies itself (fused: a gated adapter over its frozen base, the default when the model has one):
        verifier = none (the model's own frozen base)
    otherwise (two_model, lookup, ...):
        verifier = --base NAME, default the model.pretrained it was fine-tuned from (followed through init_from)
```

``load_speculative`` loads what that decision names (both on ``device``; fp32 weights packed for oneDNN unless
``lean=False``), checks the pair (``check_verifier``), builds the drafter once to refuse what cannot work before any
request or prompt, and returns ``SpeculativeModels``: the models, the drafter's resolved name, and ``drafter_for``,
which builds a fresh drafter for one generation's settings (its knobs differ per request in the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockdiff.errors import UsageError

__all__ = ["PLAIN_DECODER_DRAFTER", "SpeculativeModels", "load_speculative", "plain_decoder", "blockdiff_kind"]

PLAIN_DECODER_DRAFTER = "lookup"  # a plain decoder's drafter when none is named and no drafter ships for it
SHIPPED_DRAFTER = "hybrid"  # ... and when one ships for it (modeling/dflash.py: shipped_drafter)
NETWORK_DRAFTERS = ("dflash", "hybrid")  # drafters that read a DFlash network (loaded here: load_drafter)


@dataclass
class SpeculativeModels:
    """What speculative decoding of one path runs with (module docstring)."""

    model: Any  # the BlockDiffusionLM that drafts (or drafts and verifies: fused); None for a plain decoder
    verifier: Any  # the plain causal LM that verifies; None when the model verifies itself (fused)
    tokenizer: Any
    drafter: str  # the registered drafter's name, resolved (never None)
    who: str  # for people: "lookup: smollm2 verifies"
    loaded: Any = None  # the blockdiff run or model directory (``LoadedModel``); None for a plain decoder
    settings: dict = field(default_factory=dict)  # drafter knobs given at load: the defaults of every generation
    network: Any = None  # a drafter's own network (a DFlash drafter), passed to it as its model

    @property
    def generation_config(self):
        """The settings a generation starts from (a copy): the model's own, or the defaults for a plain decoder, with
        ``settings`` over them."""
        from blockdiff.sampling.config import BlockDiffusionGenerationConfig
        from blockdiff.sampling.inputs import with_overrides

        base = self.model.generation_config if self.model is not None else BlockDiffusionGenerationConfig()
        return with_overrides(base, self.settings)

    @property
    def max_positions(self) -> int | None:
        """Positions the verifier has (a prompt must leave room in them); None: unknown."""
        base = self.verifier if self.verifier is not None else self.model.backbone
        return getattr(base.config, "max_position_embeddings", None)

    def drafter_for(self, config):
        """A fresh drafter (``sampling.speculative.base.Drafter``) for one generation with ``config`` (its knobs);
        ``config.drafter`` must be this drafter or unset."""
        from blockdiff.sampling.inputs import with_overrides
        from blockdiff.sampling.speculative import make_drafter

        if config.drafter not in (None, self.drafter):
            raise UsageError(f"drafter={config.drafter!r}: these models draft with {self.drafter}")
        model = self.model if self.model is not None else self.network
        return make_drafter(model, with_overrides(config, {"drafter": self.drafter}), self.verifier)


def blockdiff_kind(path) -> str | None:
    """``"run"`` or ``"model"`` when ``path`` is a blockdiff run or model directory (a block diffuser); else None."""
    from blockdiff.modeling.rundir import is_run_dir, model_dir_of
    from blockdiff.modeling.spec import SPEC_FILE

    root = Path(path)
    if not root.is_dir():
        return None
    return "run" if is_run_dir(root) else "model" if (model_dir_of(root) / SPEC_FILE).is_file() else None


def plain_decoder(path: str, drafter: str | None) -> bool:
    """Whether ``path`` is verified as a plain decoder (module docstring): it is no blockdiff run or model, and either
    the drafter named needs no block diffuser (then a hub id counts as a decoder too) or none is named and ``path``
    is a decoder here (an offline alias such as ``smollm2``, a ``.gguf`` or a local directory)."""
    import blockdiff.sampling.speculative  # noqa: F401 - registers the built-in drafters
    from blockdiff.sampling.speculative.registry import drafter_class

    if blockdiff_kind(path) is not None:
        return False
    if drafter is not None:
        return not drafter_class(drafter).needs_block_model
    return _local_decoder(path)


def _local_decoder(path: str) -> bool:
    """An offline alias (``smollm2``), a ``.gguf`` or a local directory: a decoder here, when no blockdiff one."""
    from blockdiff.modeling.pretrained import OFFLINE_MODELS

    return path in OFFLINE_MODELS or str(path).endswith(".gguf") or Path(path).is_dir()


def load_speculative(path: str, drafter: str | None = None, base: str | None = None, *, device: str | None = None,
                     lean: bool | None = None, block_length: int | None = None,
                     settings: dict | None = None) -> SpeculativeModels:
    """The models speculative decoding of ``path`` runs with, loaded and checked (module docstring). ``drafter``:
    a registered drafter's name (None: the default for this path); ``base``: the verifier of a block diffuser
    (``--base``); ``block_length``: draft at another block length the network supports (a block diffuser only);
    ``settings``: drafter knobs every generation starts from (checked here, with the drafter built once)."""
    import blockdiff.sampling.speculative  # noqa: F401 - registers the built-in drafters
    from blockdiff.sampling.speculative.registry import drafter_class

    if drafter is not None:
        drafter_class(drafter)  # an unknown name: the error lists the registered ones
    if plain_decoder(path, drafter):
        if base is not None or block_length is not None:
            raise UsageError(f"{path} is a plain decoder and verifies the drafts itself: --base and --block-length "
                             "apply to a block diffuser (give a blockdiff run or model instead)")
        return _plain(path, drafter, device, lean, settings or {})
    from blockdiff.modeling.io import load_model_dir

    if drafter is not None and blockdiff_kind(path) is None and _local_decoder(path):  # it needs a block diffuser
        raise UsageError(f"--drafter {drafter} drafts with a block diffuser, but {path} is a plain decoder: give a "
                         f"blockdiff run or model (its base verifies), or --drafter {PLAIN_DECODER_DRAFTER}")
    loaded = load_model_dir(path, device=device, lean=lean)
    if block_length is not None:  # e.g. a block-length-mixture model at another of its lengths
        loaded.model = loaded.model.with_block_length(block_length).eval()
    from blockdiff.sampling.speculative.registry import needs_verifier

    verifier, who = None, "the model's own frozen base verifies"
    if base is not None or needs_verifier(loaded.model, drafter):
        name = base or _base_of(loaded)
        verifier = _verifier(name, loaded, lean)
        who = f"{name} verifies"
    models = SpeculativeModels(loaded.model, verifier, loaded.tokenizer, drafter or "", who, loaded, settings or {})
    return _named(models, drafter)


def _plain(name: str, drafter: str, device, lean, settings: dict) -> SpeculativeModels:
    """A plain decoder verifying drafts that need no block diffuser."""
    from blockdiff.modeling.device import resolve_device
    from blockdiff.modeling.lean import pack_linears, use_lean
    from blockdiff.modeling.pretrained import load_decoder

    verifier, tokenizer, _ = load_decoder(name, what="the model")
    verifier = verifier.to(resolve_device(device)).eval()
    if use_lean(verifier, lean):
        pack_linears(verifier)
    network = None
    if drafter is None:  # the shipped drafter where one fits, lookup otherwise
        from blockdiff.modeling.dflash import shipped_drafter

        drafter = SHIPPED_DRAFTER if shipped_drafter(verifier) is not None else PLAIN_DECODER_DRAFTER
    if drafter in NETWORK_DRAFTERS:
        from blockdiff.modeling.dflash import load_drafter

        network = load_drafter(settings.get("dflash_path"), verifier, lean)
    models = SpeculativeModels(None, verifier, tokenizer, drafter, f"{name} verifies", settings=settings,
                               network=network)
    return _named(models, drafter)


def _named(models: SpeculativeModels, drafter: str | None) -> SpeculativeModels:
    """``models`` with the drafter's resolved name, its settings checked and the drafter built once now, so what
    cannot draft is refused before any work."""
    from blockdiff.sampling.inputs import with_overrides
    from blockdiff.sampling.resolve import resolve
    from blockdiff.sampling.speculative import make_drafter

    config = with_overrides(models.generation_config, {"drafter": drafter})
    resolve(models.model, config, speculative=True)  # the settings checked: the drafters' knobs among them
    pair = make_drafter(models.model if models.model is not None else models.network, config, models.verifier)
    models.drafter = pair.name
    models.who = f"{pair.name}: {models.who}"
    return models


def _base_of(loaded) -> str:
    """The decoder a model was fine-tuned from: ``model.pretrained`` of its training config, followed through
    ``model.init_from`` when a run continued an earlier blockdiff model."""
    from blockdiff.modeling.io import read_train_config
    from blockdiff.modeling.rundir import model_dir_of

    cfg, seen = loaded.config, [loaded.directory]
    while cfg.model.pretrained is None and cfg.model.init_from is not None and len(seen) < 8:
        seen.append(model_dir_of(cfg.model.init_from))
        cfg = read_train_config(seen[-1])
    if cfg.model.pretrained is None:
        raise UsageError(
            f"{loaded.directory} was not fine-tuned from a pretrained decoder (its train_config.yaml sets no "
            "model.pretrained), so it has no base to verify its drafts: pass --base NAME, a causal LM with the same "
            "tokenizer (a local directory, a .gguf, smollm2 or a hub id)"
        )
    return cfg.model.pretrained


def _verifier(name: str, loaded, lean: bool | None):
    """The base decoder ``name`` loaded next to the model (its device; packed unless ``lean=False``) and checked
    against it."""
    from blockdiff.modeling.lean import pack_linears, use_lean
    from blockdiff.modeling.pretrained import load_decoder
    from blockdiff.sampling.speculative import check_verifier

    _check_base(name, loaded)
    verifier, verifier_tokenizer, _ = load_decoder(name, what="--base")
    verifier = verifier.to(loaded.model.device).eval()
    if use_lean(verifier, lean):
        pack_linears(verifier)
    check_verifier(verifier, loaded.model, tokenizer=loaded.tokenizer, verifier_tokenizer=verifier_tokenizer)
    return verifier


def _check_base(name: str, loaded) -> None:
    """Refuse, before a weight is loaded, a verifier that cannot be one: a blockdiff model or run (a block diffuser
    is no autoregressive verifier, so "lossless" would mean nothing) or a decoder whose declared vocabulary is larger
    than the model's (``check_verifier`` checks the rest once it is loaded)."""
    from blockdiff.modeling.pretrained import declared_vocab_size, resolve_source

    source = resolve_source(name)
    kind = None if source.gguf_file else blockdiff_kind(source.name_or_path)
    if kind is not None:
        raise UsageError(
            f"--base {name} is a blockdiff {kind} (a block diffuser), not an "
            "autoregressive decoder: the verifier must be the decoder the model was fine-tuned from (its "
            "model.pretrained, used when --base is left out), or the output would not be that decoder's"
        )
    vocab, ours = declared_vocab_size(source), loaded.model.vocab_size
    if vocab is not None and vocab > ours:
        raise UsageError(
            f"--base {name} has a vocabulary of {vocab} tokens, larger than the model's {ours}: they do not share a "
            "tokenizer; pass the decoder the model was fine-tuned from (its model.pretrained)"
        )
