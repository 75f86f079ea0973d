"""``resolve_device``: a device name from the command line (``cpu``, ``cuda[:N]``, ``mps``, ``auto``) checked
against what this machine has."""

from __future__ import annotations

import torch

from blockdiff.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``cpu`` (the default), ``cuda``/``cuda:N``, ``mps``, or ``auto`` (CUDA, else MPS, else CPU); a device that is not
    available here is a ``UsageError`` saying which are."""
    if isinstance(name, torch.device):
        return name
    name = (name or "cpu").strip().lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use cpu, cuda, cuda:N, mps or auto") from None
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if has_mps else [])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (available: {', '.join(available)})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)")
    if device.type == "mps" and not has_mps:
        raise UsageError(f"--device {name}: MPS is not available here (available: {', '.join(available)})")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type; use cpu, cuda, cuda:N, mps or auto")
    return device
