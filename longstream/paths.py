"""Checks on the files a command will write, made before any work so a bad path fails at once in one line, and
where a written file lands.

Outputs are written to a hidden file beside the target and renamed onto it; for a symlink the target is the file
it points to (`final_path`), so the link stays a link and its file is replaced atomically, as a plain write would."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError


def final_path(path: str | os.PathLike) -> Path:
    """The file that writing `path` replaces: the end of its symlinks (absolute), else `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def output_file(path: str | os.PathLike, suffix: str | None = None, what: str = "output") -> Path:
    """`path` as a Path once it can be written: is not a folder, ends in `suffix` (when given, any case), and its
    folder (a symlink's target's) exists, is a folder and is writable. Raises UsageError naming `what` otherwise."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{what} {out} is a folder")
    if suffix is not None and out.suffix.lower() != suffix:
        raise UsageError(f"{what} {out} must end in {suffix}")
    folder = final_path(out).parent
    if not folder.exists():
        raise UsageError(f"{what} {out}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{what} {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {out}: folder {folder} is not writable")
    return out


def check_json_option(parser: argparse.ArgumentParser, path: str | None, option: str) -> None:
    """A script's JSON output option checked before any work (`output_file`): a path that cannot be written ends
    the script at once with argparse's one-line error. None (the option not given) passes."""
    if path:
        try:
            output_file(path, ".json", option)
        except UsageError as exc:
            parser.error(str(exc))


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the hidden file to write in place of `path` (beside `final_path(path)`, named after the process, so
    concurrent writers do not collide); on leaving the block without an error it is renamed onto the target, and in
    every case no temporary file is left behind."""
    target = final_path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to a hidden file beside `final_path(path)`, fsync it and rename it onto the target."""
    with atomic_replace(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
