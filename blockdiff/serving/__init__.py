"""``blockdiff serve``: an OpenAI-compatible HTTP server for a blockdiff model (``pip install 'blockdiff[serve]'``).

* ``protocol.py`` — request bodies checked into ``GenerationRequest``s, OpenAI-shaped errors and responses;
* ``engine.py`` — the queue and the worker thread that batches jobs with equal settings through ``generate``;
* ``speculative.py`` — ``--speculative``: the engine that decodes each job by lossless speculative decoding;
* ``deltas.py`` — streamed text, one finished block at a time, never a character the final text drops;
* ``app.py`` — the FastAPI routes.

``serve(path, ...)`` loads a run or model directory and runs it under uvicorn until interrupted. Docs:
docs/serving.md. No Lightning, no ``datasets``.
"""

from __future__ import annotations

from pathlib import Path

from blockdiff.errors import MissingPackageError, UsageError

__all__ = ["build_engine", "serve"]


def _check_packages() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(f"blockdiff serve needs {' and '.join(missing)}: pip install 'blockdiff[serve]'")


def build_engine(path: str | Path, name: str | None = None, device: str | None = None, lean: bool | None = None,
                 speculative: bool = False, drafter: str | None = None, base: str | None = None,
                 drafter_settings: dict | None = None, **options):
    """An ``Engine`` (not started) over the model in ``path``, served under ``name`` (default: the folder name);
    ``lean``: as ``load_model_dir``'s (``None``: packed kernels on CPU in fp32). ``speculative``: decode every
    request speculatively (``SpeculativeEngine``) with the verifier and drafter ``load_speculative`` picks for
    ``path`` (``drafter``: a registered drafter's name; ``base``: a block diffuser's verifier; ``drafter_settings``:
    drafter knobs, the server's defaults); ``path`` may then be a plain decoder too (``smollm2``, a .gguf, a local
    directory)."""
    if not speculative and (drafter is not None or base is not None or drafter_settings):
        raise UsageError("--drafter, its settings and --base choose the drafter and verifier of --speculative "
                         "decoding; add --speculative")
    if speculative:
        from blockdiff.modeling.speculative import load_speculative
        from blockdiff.serving.speculative import SpeculativeEngine

        models = load_speculative(str(path), drafter, base, device=device, lean=lean, settings=drafter_settings)
        if name is None:
            name = _served_name(path) if models.loaded is not None else Path(str(path)).stem or str(path)
        return SpeculativeEngine(models, name, **options)
    from blockdiff.modeling.io import load_model_dir
    from blockdiff.serving.engine import Engine

    loaded = load_model_dir(path, device=device, lean=lean)
    return Engine(loaded, name or _served_name(path), **options)


def _served_name(path) -> str:
    """A run's name (its folder's, also for its model/ folder) or a model folder's."""
    from blockdiff.modeling.rundir import model_dir_of

    folder = model_dir_of(path).resolve()
    return folder.parent.name if folder.name == "model" else folder.name


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          device: str | None = None, log_level: str = "info", max_body_bytes: int | None = None, **options) -> None:
    """Serve the model in ``path`` on ``host:port`` until interrupted (``options``: ``Engine``'s batching knobs and
    limits; ``max_body_bytes``: the request body limit, default ``app.MAX_BODY_BYTES``)."""
    _check_packages()
    import uvicorn

    from blockdiff.serving.app import MAX_BODY_BYTES, create_app

    engine = build_engine(path, name, device, **options)
    engine.start()
    try:
        uvicorn.run(create_app(engine, max_body_bytes or MAX_BODY_BYTES), host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
