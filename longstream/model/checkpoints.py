"""Transformer checkpoints in longstream's safetensors layout.

Format (one `.safetensors` file):
- tensors: the state dict of `CausalWanTransformer`, i.e. diffusers' `WanTransformer3DModel` parameter names;
- metadata `longstream_format` = "transformer/1" and `config` = the `TransformerConfig` as JSON.

Every problem (missing file, truncated or foreign file, wrong preset, missing/unexpected/mis-shaped keys) raises
`CheckpointError` with one line naming the file and the first problems.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, TransformerConfig
from ..errors import LongstreamError
from ..safetensors_io import load, save_atomic
from .fuse_qkv import has_fused_qkv
from .transformer import CausalWanTransformer, config_dict

FORMAT = "transformer/1"


class CheckpointError(LongstreamError):
    """A checkpoint that cannot be loaded; the message names the file and the first problem."""


def save_transformer(model: CausalWanTransformer, path: str | Path, extra_metadata: dict | None = None) -> None:
    """Write atomically: a temporary file beside the target, then rename."""
    if has_fused_qkv(model):
        raise CheckpointError("cannot save a model with fused q/k/v projections (fuse_qkv is for inference); save "
                              "it before fusing")
    metadata = {"longstream_format": FORMAT, "config": json.dumps(config_dict(model.config))}
    metadata.update(extra_metadata or {})
    save_atomic(model.state_dict(), path, metadata)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with CheckpointError for anything unreadable."""
    return load(path, CheckpointError, "checkpoint")


def check_state_dict(path: str | Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped keys, or naming non-finite weights."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label} {len(items)}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: {'; '.join(problems)}")
    broken = [k for k in sorted(state) if _not_finite(state[k])]
    if broken:
        more = f" (+{len(broken) - 3} more)" if len(broken) > 3 else ""
        raise CheckpointError(f"{path}: NaN or infinite weights in {', '.join(broken[:3])}{more}")


def _not_finite(tensor: torch.Tensor) -> bool:
    """A float tensor of 16 bits or more holding NaN or Inf (float8 and packed NVFP4 codes are not checked)."""
    return tensor.is_floating_point() and tensor.element_size() >= 2 and not bool(torch.isfinite(tensor).all())


def load_transformer(
    path: str | Path,
    expected: TransformerConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> CausalWanTransformer:
    """Load a checkpoint; `expected` (e.g. a preset's config) must match the file's config when both exist."""
    state, metadata = read_safetensors(path)
    config = expected
    if "config" in metadata:
        try:
            stored = TransformerConfig(**json.loads(metadata["config"]))
        except (TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"{path}: bad config in metadata ({exc})") from None
        if expected is not None and stored != expected:
            diff = next(k for k, v in config_dict(stored).items() if config_dict(expected)[k] != v)
            raise CheckpointError(
                f"{path}: checkpoint is for another model: {diff}={getattr(stored, diff)} "
                f"but the preset has {getattr(expected, diff)}"
            )
        config = stored
    if config is None:
        raise CheckpointError(f"{path}: no config in the file; name a preset")
    with torch.device("meta"):
        model = CausalWanTransformer(config)
    check_state_dict(path, state, model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
