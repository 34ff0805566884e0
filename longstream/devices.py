"""Device names from the command line and configs."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; anything else is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def has_tma(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.x or 10.x (Hopper, datacenter Blackwell): a TMA unit, FP8 tensor cores
    and the ~228 KB of shared memory a block of the persistent TMA kernels needs (consumer Blackwell has ~99 KB)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)
