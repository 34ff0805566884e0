"""A symlinked output for the tests that write through one."""

from pathlib import Path


def link_to_existing_file(tmp_path: Path, folder: str, name: str, link_name: str) -> tuple[Path, Path]:
    """`tmp_path/folder/name` holding old bytes, and the symlink `tmp_path/link_name` to it: (link, target)."""
    target = tmp_path / folder / name
    target.parent.mkdir()
    target.write_bytes(b"previous content")
    link = tmp_path / link_name
    link.symlink_to(target)
    return link, target
