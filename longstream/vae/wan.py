"""Wan video VAE (diffusers ``AutoencoderKLWan``): architecture presets, latent normalisation, shape checks.

Formats used throughout ``longstream.vae``:

* video: ``[B, 3, T, H, W]`` float in ``[-1, 1]``; ``T = 1 + 4 * (F - 1)`` frames for ``F`` latent frames.
* VAE latents ("vae space"): ``[B, z_dim, F, H / s, W / s]`` exactly as ``vae.decode`` takes them and
  ``vae.encode(x).latent_dist.mode()`` returns them (``s`` = spatial factor, 8 for Wan2.1, 16 for Wan2.2).
* model latents ("model space"): ``(z_vae - mean) / std`` per channel, what the diffusion transformer sees
  (the diffusers Wan pipeline convention, ``latents_mean`` / ``latents_std`` of the VAE config).

Latent frame ``i > 0`` covers raw frames ``[1 + 4 (i - 1), 1 + 4 i)``; latent 0 covers frame 0 alone.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan

TEMPORAL_FACTOR = 4  # diffusers' Wan encode/decode loops hard-code 1 + 4k frames

# Per-channel latent statistics of the released checkpoints (diffusers configs / convert_wan_to_diffusers.py).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]

_COMMON: dict[str, Any] = dict(
    dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
    dropout=0.0, scale_factor_temporal=TEMPORAL_FACTOR,
)
_SMALL: dict[str, Any] = dict(_COMMON, dim_mult=[1, 1, 1, 1], num_res_blocks=1)

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # Wan2.1: z16, 8x spatial, 4x temporal (the released 1.3B/14B VAE).
    "wan2.1": dict(_COMMON, base_dim=96, z_dim=16, latents_mean=WAN21_LATENTS_MEAN,
                   latents_std=WAN21_LATENTS_STD, scale_factor_spatial=8),
    # Wan2.2 (TI2V-5B): z48, 2x2 patchify + 8x = 16x spatial, residual down/up blocks, wider decoder.
    "wan2.2": dict(_COMMON, base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                   out_channels=12, patch_size=2, latents_mean=WAN22_LATENTS_MEAN,
                   latents_std=WAN22_LATENTS_STD, scale_factor_spatial=16),
    # Embedded model's VAE: Wan2.1 architecture, z16, 8x/4x, small enough for 128x128 video on a CPU
    # (20 s at 16 fps decodes in ~20 s on 2 cores with StreamingDecoder(frames_per_call=2), ~40 s with 1).
    "tiny": dict(_SMALL, base_dim=16, z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
                 scale_factor_spatial=8),
    # Minimal unit-test architectures (same structure as the released ones, 3 base channels).
    "test-wan2.1": dict(_SMALL, base_dim=3, z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
                        scale_factor_spatial=8),
    "test-wan2.2": dict(_SMALL, base_dim=3, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                        patch_size=2, latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_spatial=16),
}


def vae_config(kind: str, **overrides: Any) -> dict[str, Any]:
    """``AutoencoderKLWan`` keyword arguments for ``kind`` (see ``VAE_CONFIGS``), updated by ``overrides``."""
    if kind not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE kind {kind!r}; choose one of {', '.join(VAE_CONFIGS)}")
    cfg = {k: list(v) if isinstance(v, list) else v for k, v in VAE_CONFIGS[kind].items()}
    cfg.update(overrides)
    return cfg


def build_vae(
    kind: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> AutoencoderKLWan:
    """Construct a Wan VAE of ``kind`` ("wan2.1" | "wan2.2" | "tiny" | "test-wan2.1" | "test-wan2.2").

    Weights are random (diffusers' init, optionally seeded); load real weights separately. ``device="meta"``
    builds the structure without allocating weights (e.g. to inspect the full-size architectures).
    Returns the model in eval mode.
    """
    cfg = vae_config(kind, **overrides)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return AutoencoderKLWan(**cfg).eval()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(**cfg)
    else:
        vae = AutoencoderKLWan(**cfg)
    vae = cast_vae(vae, dtype)
    return (vae if device is None else vae.to(device)).eval()


def cast_vae(vae: AutoencoderKLWan, dtype: torch.dtype) -> AutoencoderKLWan:
    """`vae` with parameters and buffers in `dtype`, in place (nn.Module's cast: diffusers' own `to` warns about
    modules to keep in float32 on every cast, and this VAE lists none)."""
    return torch.nn.Module.to(vae, dtype=dtype)


def vae_param(vae: AutoencoderKLWan) -> torch.Tensor:
    """A parameter of the VAE (for its device and dtype)."""
    return vae.post_quant_conv.weight


def latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) from the VAE config, shaped ``[1, C, 1, 1, 1]`` like ``like``."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
    shape = (1, -1, 1, 1, 1)
    return (mean.view(shape).to(like.device, like.dtype), std.view(shape).to(like.device, like.dtype))


def normalize(vae: AutoencoderKLWan, z_vae: torch.Tensor) -> torch.Tensor:
    """VAE-space latents ``[B, C, F, h, w]`` -> model space: ``(z_vae - mean) / std`` per channel."""
    check_latents(vae, z_vae)
    mean, std = latent_stats(vae, z_vae)
    return (z_vae - mean) / std


def denormalize(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """Model-space latents ``[B, C, F, h, w]`` -> VAE space: ``z * std + mean`` per channel."""
    check_latents(vae, z)
    mean, std = latent_stats(vae, z)
    return z * std + mean


def num_latent_frames(num_frames: int) -> int:
    """Latent frames for ``num_frames`` raw frames; requires ``num_frames = 1 + 4k``."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"a Wan clip has 1 + {TEMPORAL_FACTOR}k frames, got {num_frames}")
    return 1 + (num_frames - 1) // TEMPORAL_FACTOR


def num_video_frames(num_latents: int) -> int:
    """Raw frames decoded from ``num_latents`` latent frames: ``1 + 4 (F - 1)`` (0 for 0)."""
    if num_latents < 0:
        raise ValueError(f"negative latent frame count {num_latents}")
    return 0 if num_latents == 0 else 1 + TEMPORAL_FACTOR * (num_latents - 1)


def check_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> None:
    """Raise ValueError unless ``z`` is ``[B, z_dim, F, h, w]`` for this VAE."""
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError(f"latents must be a 5-D tensor [B, C, F, H, W], got shape {tuple(getattr(z, 'shape', ()))}")
    if z.shape[1] != vae.config.z_dim:
        raise ValueError(f"latents have {z.shape[1]} channels, this VAE expects z_dim={vae.config.z_dim}")


def check_video(vae: AutoencoderKLWan, video: torch.Tensor) -> None:
    """Raise ValueError unless ``video`` is ``[B, 3, T, H, W]`` with H, W multiples of the spatial factor."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        raise ValueError(
            f"video must be a 5-D tensor [B, 3, T, H, W], got shape {tuple(getattr(video, 'shape', ()))}"
        )
    patch = vae.config.patch_size or 1
    channels = vae.config.in_channels // (patch * patch)
    if video.shape[1] != channels:
        raise ValueError(f"video has {video.shape[1]} channels, this VAE expects {channels}")
    s = vae.config.scale_factor_spatial
    if video.shape[3] % s or video.shape[4] % s:
        raise ValueError(f"video size {video.shape[4]}x{video.shape[3]} is not a multiple of the VAE's {s}x")
