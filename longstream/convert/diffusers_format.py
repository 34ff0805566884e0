"""diffusers-format Wan weights: a `WanTransformer3DModel` folder (config.json + safetensors, possibly sharded), a
single safetensors file in diffusers naming, and `AutoencoderKLWan` VAE folders.

Our parameter names are diffusers', so the key table is the identity; the config comes from config.json
(`num_attention_heads`, `attention_head_dim`, `num_layers`, `ffn_dim`, `in_channels`, `out_channels`, `text_dim`,
`freq_dim`, `patch_size`, `eps`, `cross_attn_norm`). Image conditioning (`image_dim`, `added_kv_proj_dim`), learned
position embeddings (`pos_embed_seq_len`) and other `qk_norm` kinds have no counterpart here and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, TransformerConfig
from ..model.checkpoints import CheckpointError, check_state_dict
from ..model.transformer import config_from_diffusers
from .files import component_dir, read_config, read_weights
from .keys import check_config, infer_config

TRANSFORMER_CLASS = "WanTransformer3DModel"
VAE_CLASS = "AutoencoderKLWan"


def transformer_config(path: str | Path, config: dict) -> TransformerConfig:
    """Our TransformerConfig from a diffusers config.json dict; CheckpointError for other models or options."""
    kind = config.get("_class_name", TRANSFORMER_CLASS)
    if kind != TRANSFORMER_CLASS:
        raise CheckpointError(f"{path}: config.json is for a {kind}, not a {TRANSFORMER_CLASS}")
    unsupported = [k for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if config.get(k)]
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        unsupported.append(f"qk_norm={config['qk_norm']}")
    if unsupported:
        raise CheckpointError(f"{path}: unsupported {TRANSFORMER_CLASS} options: {', '.join(unsupported)}")
    defaults = {"out_channels": None, "freq_dim": 256, "patch_size": (1, 2, 2), "eps": 1e-6, "cross_attn_norm": True}
    try:
        return config_from_diffusers({**defaults, **config})
    except KeyError as exc:
        raise CheckpointError(f"{path}: config.json lacks {exc.args[0]}") from None
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad config.json ({exc})") from None


def read_diffusers(
    path: str | Path, expected: TransformerConfig | None = None
) -> tuple[dict[str, torch.Tensor], TransformerConfig]:
    """(state dict, config) of a diffusers transformer folder (or pipeline folder, or single diffusers-named
    safetensors file, whose config is inferred from its shapes). The config must equal `expected` when given."""
    path = Path(path)
    folder = component_dir(path, "transformer")
    if folder.is_dir():
        config = transformer_config(folder / "config.json", read_config(folder))
        state = read_weights(folder)
    else:
        state = read_weights(path)
        heads = expected.num_attention_heads if expected is not None else None
        config = infer_config(path, state, heads)
    return state, check_config(folder, config, expected)


def load_diffusers_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """An `AutoencoderKLWan` (Wan2.1 or 2.2) from a diffusers VAE folder or pipeline folder, checked strictly:
    missing, unexpected and mis-shaped tensors are listed in one CheckpointError naming the folder."""
    from diffusers import AutoencoderKLWan

    from ..vae.wan import cast_vae

    folder = component_dir(path, "vae")
    config = read_config(folder)
    kind = config.get("_class_name", VAE_CLASS)
    if kind != VAE_CLASS:
        raise CheckpointError(f"{folder}: config.json is for a {kind}, not a {VAE_CLASS}")
    try:
        with torch.device("meta"):
            vae = AutoencoderKLWan.from_config(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: bad VAE config ({exc})") from None
    state = read_weights(folder)
    check_state_dict(folder, state, vae.state_dict())
    vae.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        vae = cast_vae(vae, dtype)
    return vae.to(device).eval()
