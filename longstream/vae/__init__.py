"""Wan video VAE: presets, latent normalisation, streaming decode, chunked encode with a derived halo."""

from .encode import (
    FrameWindow,
    encode_chunked,
    encode_range,
    encode_whole,
    encoder_halo_latents,
    frame_window,
)
from .streaming import StreamingDecoder
from .wan import (
    TEMPORAL_FACTOR,
    VAE_CONFIGS,
    build_vae,
    check_latents,
    check_video,
    denormalize,
    latent_stats,
    normalize,
    num_latent_frames,
    num_video_frames,
    vae_config,
)

__all__ = [
    "FrameWindow",
    "StreamingDecoder",
    "TEMPORAL_FACTOR",
    "VAE_CONFIGS",
    "build_vae",
    "check_latents",
    "check_video",
    "denormalize",
    "encode_chunked",
    "encode_range",
    "encode_whole",
    "encoder_halo_latents",
    "frame_window",
    "latent_stats",
    "normalize",
    "num_latent_frames",
    "num_video_frames",
    "vae_config",
]
