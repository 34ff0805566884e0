"""Original Wan checkpoints (Wan-AI/Wan2.1-T2V-1.3B, Wan-AI/Wan2.2-TI2V-5B, ComfyUI repackages): safetensors in
Wan's own parameter naming, one file or a sharded folder whose config.json has `_class_name` "WanModel" and
`num_heads`. Names may carry a `model.diffusion_model.` prefix (ComfyUI). See `keys.py` for the key table.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TransformerConfig
from .files import read_config, read_weights
from .keys import from_original

PREFIXES = ("model.diffusion_model.",)


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`state` without the first of `prefixes` that every key carries (unchanged when none does)."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_wan(
    path: str | Path, expected: TransformerConfig | None = None
) -> tuple[dict[str, torch.Tensor], TransformerConfig]:
    """(state dict in our naming, config) of an original Wan safetensors file or folder."""
    path = Path(path)
    heads = None
    if path.is_dir() and (path / "config.json").is_file():
        heads = read_config(path).get("num_heads")
    return from_original(path, strip_prefix(read_weights(path), PREFIXES), expected, heads)
