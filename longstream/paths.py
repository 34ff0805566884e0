"""Checks on the files a command will write, made before any work so a bad path fails at once in one line."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError


def output_file(path: str | os.PathLike, suffix: str | None = None, what: str = "output") -> Path:
    """`path` as a Path once it can be written: is not a folder, ends in `suffix` (when given, any case), and its
    folder exists, is a folder and is writable. Raises UsageError naming `what` otherwise."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{what} {out} is a folder")
    if suffix is not None and out.suffix.lower() != suffix:
        raise UsageError(f"{what} {out} must end in {suffix}")
    folder = out.parent
    if not folder.exists():
        raise UsageError(f"{what} {out}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{what} {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {out}: folder {folder} is not writable")
    return out
