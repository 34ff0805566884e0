"""VAE checkpoints in longstream's safetensors layout.

Format (one `.safetensors` file):
- tensors: the state dict of diffusers' `AutoencoderKLWan`;
- metadata `longstream_format` = "vae/1" and `config` = the `AutoencoderKLWan` constructor arguments as JSON
  (including `latents_mean` / `latents_std`, the per-channel statistics that map VAE latents to model space).

Problems (missing, truncated or foreign file, config that does not fit the tensors) raise `CheckpointError` with
one line naming the file.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from ..model.checkpoints import CheckpointError, check_state_dict, read_safetensors
from ..safetensors_io import save_atomic
from .wan import cast_vae

FORMAT = "vae/1"


def vae_init_config(vae: AutoencoderKLWan) -> dict:
    """The constructor arguments that rebuild `vae` (from its diffusers config)."""
    names = [p for p in inspect.signature(AutoencoderKLWan.__init__).parameters if p != "self"]
    return {k: (list(vae.config[k]) if isinstance(vae.config[k], tuple) else vae.config[k])
            for k in names if k in vae.config}


def save_vae(vae: AutoencoderKLWan, path: str | Path, **config_overrides) -> None:
    """Write atomically; `config_overrides` (e.g. fitted `latents_mean` / `latents_std`) replace config entries."""
    config = vae_init_config(vae)
    unknown = set(config_overrides) - set(config)
    if unknown:
        raise ValueError(f"not AutoencoderKLWan settings: {', '.join(sorted(unknown))}")
    config.update(config_overrides)
    save_atomic(vae.state_dict(), path, {"longstream_format": FORMAT, "config": json.dumps(config)})


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
             ) -> AutoencoderKLWan:
    """The VAE stored at `path`, in eval mode."""
    state, metadata = read_safetensors(path)
    if metadata.get("longstream_format") != FORMAT:
        raise CheckpointError(f"{path}: not a longstream VAE file (format {metadata.get('longstream_format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        config = json.loads(metadata["config"])
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad VAE config in metadata ({exc})") from None
    check_state_dict(path, state, vae.state_dict())
    vae.load_state_dict(state, strict=True, assign=True)
    return cast_vae(vae, dtype).to(device).eval()
