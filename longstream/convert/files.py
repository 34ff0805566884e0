"""Reading weights laid out the Hugging Face way: one safetensors file, or a folder of shards with an index.

A sharded folder holds ``<name>.safetensors.index.json`` = ``{"metadata": {...}, "weight_map": {tensor: shard
file}}`` next to the shard files (diffusers: ``diffusion_pytorch_model-0000i-of-0000n.safetensors``). A diffusers
pipeline folder (``model_index.json`` at the top) holds one such folder per component (``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model.checkpoints import CheckpointError, read_safetensors


def component_dir(path: str | Path, component: str) -> Path:
    """`path/component` for a diffusers pipeline folder (one with model_index.json), else `path` itself."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        sub = path / component
        if not sub.is_dir():
            raise CheckpointError(f"{path}: a diffusers pipeline folder without {component}/")
        return sub
    return path


def weight_files(folder: Path) -> tuple[list[Path], Path | None]:
    """(safetensors files, index file or None) of a model folder; CheckpointError when it is ambiguous or empty."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several weight indexes ({', '.join(p.name for p in indexes)})")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            shards = sorted({folder / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{indexes[0]}: not a readable weight index ({type(exc).__name__}: {exc})") from None
        return shards, indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        what = "no safetensors file" if not files else f"{len(files)} safetensors files and no index"
        raise CheckpointError(f"{folder}: {what}")
    return files, None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or model folder (sharded or not). A sharded set is checked against its
    index: a missing shard, or a shard holding other tensors than the index says, raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        return read_safetensors(path)[0]
    files, index = weight_files(path)
    if index is None:
        return read_safetensors(files[0])[0]
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in files:
        tensors = read_safetensors(shard)[0]
        listed = {k for k, v in weight_map.items() if v == shard.name}
        if set(tensors) != listed:
            missing = sorted(listed - set(tensors))
            extra = sorted(set(tensors) - listed)
            problem = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which the index does not list"
            raise CheckpointError(f"{shard}: shard {problem} ({len(missing)} missing, {len(extra)} unlisted)")
        state.update(tensors)
    return state


def read_config(folder: Path) -> dict:
    """config.json of a model folder as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config
