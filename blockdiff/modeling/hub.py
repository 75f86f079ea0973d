"""The Hugging Face Hub for model directories: ``local_model_dir`` (a hub id becomes a downloaded snapshot) and
``push_to_hub`` (upload a model directory, model card included). Both fail fast, with one clear message, when the
hub cannot be reached: the offline flags (``HF_HUB_OFFLINE``) are honoured, and otherwise the hub's address is probed
with a short timeout before any request that would retry for minutes.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.spec import SPEC_FILE

__all__ = ["HUB_ID", "check_repo_id", "is_hub_id", "hub_unreachable", "local_model_dir", "push_to_hub"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")  # owner/name
PROBE_SECONDS = 3.0


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(str(name))) and not Path(name).expanduser().exists()


def check_repo_id(repo_id: str, flag: str = "the hub repository") -> None:
    """Refuse, offline, a repository id the hub would refuse: not ``OWNER/NAME``, or a name huggingface_hub's own
    validator rejects (``--`` or ``..`` inside, ending in ``.git``, over 96 characters, ...)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not HUB_ID.match(repo_id):
        raise UsageError(f"{flag} must be named OWNER/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"{flag} {repo_id!r} is not a valid hub repository id: {str(err).splitlines()[0]}") from None


def hub_unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """Why the hub cannot be used now (offline flag set, or no TCP connection within ``timeout`` s), else ``None``."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(hub.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port} is not reachable within {timeout:g} s ({err.__class__.__name__})"
    return None


def local_model_dir(name: str | Path, revision: str | None = None) -> Path:
    """A local blockdiff model directory for ``name``: the path itself, or the hub snapshot of a hub id."""
    path = Path(name).expanduser()
    if path.exists() or not is_hub_id(str(name)):
        return path
    from huggingface_hub import snapshot_download

    try:  # the local cache first: a model downloaded before loads offline too
        directory = Path(snapshot_download(str(name), revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: go online if we can
        why = hub_unreachable()
        if why is not None:
            raise MissingFileError(
                f"{name} is not a local directory, and the hub id {name!r} cannot be downloaded: {why}. Pass a local "
                "model directory (a run's model/ folder or a `blockdiff export` output), or go online"
            ) from None
        try:
            directory = Path(snapshot_download(str(name), revision=revision))
        except Exception as err:  # noqa: BLE001 - any hub failure is the user's id, token or network
            raise MissingFileError(f"could not download {name!r} from the hub: {type(err).__name__}: {err}") from None
    if not (directory / SPEC_FILE).is_file():
        raise MissingFileError(
            f"the hub repository {name!r} is not a blockdiff model (no {SPEC_FILE}); a plain decoder is fine-tuned "
            f"into one with `blockdiff finetune --base {name}`"
        )
    return directory


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload blockdiff model") -> str:
    """Upload a model directory (weights, configs, tokenizer, model card) to ``repo_id``; returns the repo's URL."""
    model_dir = Path(model_dir)
    if not (model_dir / SPEC_FILE).is_file():
        raise MissingFileError(f"{model_dir} is not a blockdiff model directory (no {SPEC_FILE})")
    check_repo_id(repo_id)
    why = hub_unreachable()
    if why is not None:
        raise MissingFileError(f"cannot push to the hub: {why}. Nothing was uploaded; push again when online")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, commit_message=commit_message)
    except Exception as err:  # noqa: BLE001 - auth, permissions, network: the user's to fix
        raise UsageError(f"could not push {model_dir} to {repo_id!r}: {type(err).__name__}: {err}") from None
    return f"https://huggingface.co/{repo_id}"
