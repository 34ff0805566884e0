"""Reading and writing safetensors files the way every longstream format does.

`save_atomic` writes to a hidden temporary file beside the target (named after the process, so concurrent writers
do not collide), fsyncs it and renames it, so a crash never leaves a half-written file under the final name; a
symlink's file is replaced, the link kept (`paths.atomic_replace`). `load` returns (tensors, metadata) and
`read_format` a file's `longstream_format` from its header alone; both turn every failure (missing, truncated or
foreign file) into the caller's one-line error type, naming the file. `holds` says what a format holds, in words.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .paths import atomic_replace

# what each longstream_format holds, for messages (the formats are defined beside their readers)
_HOLDS = {"transformer/1": "a transformer checkpoint", "quantized/1": "quantized transformer weights",
          "lora/1": "a LoRA", "vae/1": "VAE weights", "prompt-embedding/1": "a cached prompt embedding"}


def save_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_replace(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o666 & ~_umask())  # safetensors writes 0600; a new file gets the usual mode


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def load(path: str | Path, error: type[Exception], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of `path`; `error(f"{path}: ...")` for anything unreadable (`what` names the kind)."""
    return _read(path, error, what, tensors=True)


def read_format(path: str | Path, error: type[Exception], what: str) -> str | None:
    """The `longstream_format` of `path` (None for a safetensors file of other origin), from its header alone;
    `load`'s errors."""
    return _read(path, error, what, tensors=False)[1].get("longstream_format")


def holds(fmt: str) -> str:
    """What a file of longstream format `fmt` holds, e.g. "VAE weights"."""
    return _HOLDS.get(fmt, f"longstream {fmt!r} data")


def _read(path: str | Path, error: type[Exception], what: str, tensors: bool
          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as exc:  # safetensors raises several error types for foreign or truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{path}: not a readable safetensors {what} ({reason})") from None
    return state, metadata
