"""Reading and writing safetensors files the way every longstream format does.

`save_atomic` writes to a hidden temporary file beside the target (named after the process, so concurrent writers
do not collide), fsyncs it and renames it, so a crash never leaves a half-written file under the final name. `load` returns (tensors, metadata) and turns every failure (missing,
truncated or foreign file) into the caller's one-line error type, naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o666 & ~_umask())  # safetensors writes 0600; a new file gets the usual mode
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def load(path: str | Path, error: type[Exception], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of `path`; `error(f"{path}: ...")` for anything unreadable (`what` names the kind)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several error types for foreign or truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{path}: not a readable safetensors {what} ({reason})") from None
    return tensors, metadata
