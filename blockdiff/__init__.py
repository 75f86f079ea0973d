"""blockdiff: block diffusion language models — autoregressive across blocks, masked diffusion inside them.

``import blockdiff`` is cheap: the public names below are loaded on first use (PEP 562), so ``blockdiff --help``
and ``blockdiff --version`` import neither torch nor transformers (``tests/test_cli_help.py``). None of the names
imports Lightning or ``datasets``.

``import blockdiff`` also registers the ``blockdiff`` model type with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (in this process only), so ``AutoModelForCausalLM.from_pretrained(model_dir)`` gives a
``BlockDiffusionLM``; without the import, plain transformers refuses a blockdiff directory. The registration
runs when transformers' Auto classes are imported (before ``import blockdiff`` or after it), not at
``import blockdiff`` itself: see ``_AutoClassHook``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from importlib.abc import MetaPathFinder

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_PUBLIC = {
    "BlockDiffusionConfig": "blockdiff.modeling.model",
    "BlockDiffusionLM": "blockdiff.modeling.model",
    "BlockDiffusionSpec": "blockdiff.modeling.spec",
    "Config": "blockdiff.config",
    "ConfigError": "blockdiff.config",
    "LoadedModel": "blockdiff.modeling.io",
    "LossOutput": "blockdiff.core.loss",
    "block_diffusion_loss": "blockdiff.core.loss",
    "build_backbone": "blockdiff.training.builders",
    "load_config": "blockdiff.config",
    "load_model_dir": "blockdiff.modeling.io",
    "register_auto_classes": "blockdiff.modeling.model",
    "sample_texts": "blockdiff.sampling",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """``blockdiff.X`` for a public name: import its module on first access (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'blockdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later accesses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _sampler_names() -> tuple[str, ...]:
    """The registered sampler names, for the run config's ``sample.sampler`` check: the sampler registry (and
    torch) is imported when a config is checked, not at ``import blockdiff``. Once imported, the registry installs
    its own lookup in place of this one."""
    from blockdiff.sampling import sampler_names

    return tuple(sampler_names())


class _AutoClassHook(MetaPathFinder):
    """Registers the ``blockdiff`` model type with transformers' Auto classes once transformers has imported them,
    without importing torch or transformers at ``import blockdiff``.

    A ``sys.meta_path`` finder that finds nothing itself: while the registration is pending it wraps
    ``exec_module`` of every ``transformers`` / ``blockdiff`` module imported, counting how deep those imports are
    nested. When the outermost one has finished and ``transformers.models.auto.configuration_auto`` is loaded, no
    module of either package is half-initialised, so ``blockdiff.modeling.model`` can be imported safely and
    ``register_auto_classes()`` runs; then the hook removes itself. (Registering at the end of the Auto module
    itself would be too early: transformers imports it from inside ``modeling_utils``, before ``PreTrainedModel``
    exists.)"""

    def __init__(self) -> None:
        self._local = threading.local()  # .depth: watched module bodies executing in this thread (nested imports)
        self._registering = False

    def find_spec(self, name, path, target=None):
        watched = name.partition(".")[0] in ("transformers", "blockdiff")
        if not watched or self._registering:
            return None
        spec = next((s for f in sys.meta_path if f is not self and (s := _find(f, name, path, target))), None)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_then_register(module):  # on this loader instance only, for this one import
            self._local.depth = getattr(self._local, "depth", 0) + 1
            try:
                original(module)
            finally:
                self._local.depth -= 1
                with contextlib.suppress(AttributeError):
                    del loader.exec_module
            if self._local.depth == 0:
                self.register_if_ready()

        loader.exec_module = exec_then_register
        return spec

    def register_if_ready(self) -> None:
        """Register now if transformers' Auto classes are loaded (and no watched import is under way)."""
        if "transformers.models.auto.configuration_auto" not in sys.modules or self._registering:
            return
        self._registering = True
        try:
            importlib.import_module("blockdiff.modeling.model").register_auto_classes()
        finally:
            self._registering = False
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


def _find(finder, name, path, target):
    find_spec = getattr(finder, "find_spec", None)
    return find_spec(name, path, target) if find_spec is not None else None


def _install() -> None:
    import blockdiff.config  # a leaf: omegaconf, no torch

    blockdiff.config.set_sampler_names(_sampler_names)
    hook = _AutoClassHook()
    sys.meta_path.insert(0, hook)
    hook.register_if_ready()  # transformers' Auto classes were imported before blockdiff


_install()
