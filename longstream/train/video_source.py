"""Training on videos encoded during the step (`videos: world` with `vae: FILE` in a training config).

Instead of a precomputed latent dataset, every step renders its clips from the procedural world (one shot each,
example i of step k drawn from a seed derived from (seed, k, i), so a resumed run sees the data an uninterrupted
one would) and encodes them with the given VAE (frozen, latent statistics from its file). Under sequence
parallelism each rank encodes only the latent frames its share of the step reads (`ParallelTraining.frame_range`:
its Balanced SP time slice, or its contiguous split for flow matching) from the frame window those latents and
the encoder's left halo need (`vae.encode.encode_range`; the halo is derived from the architecture), so the
latents equal a whole-clip encode's and no rank runs the encoder over the rest of the clip. (A file-based video
source would read just that window from disk; the world renders whole clips, which costs little.)
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from ..vae import num_video_frames
from ..vae.encode import encode_range, frame_window, encoder_halo_latents
from .world import sample_clip

SOURCES = ("world",)


def clip_seed(seed: int, step: int, micro: int, index: int) -> int:
    """The world clip seed of example `index` of micro-batch `micro` of step `step`."""
    return ((seed * 1_000_003 + step) * 97 + micro) * 1_009 + index


def world_batch(seed: int, step: int, micro: int, indices: list[int], latent_frames: int, size: int
                ) -> tuple[torch.Tensor, list[str]]:
    """Videos [len(indices), 3, T, size, size] (T = the video frames of `latent_frames` latents) and prompts of
    the examples `indices` of a micro-batch."""
    videos, prompts = [], []
    for i in indices:
        video, shots = sample_clip(clip_seed(seed, step, micro, i), num_video_frames(latent_frames), size)
        videos.append(video)
        prompts.append(shots[0][0])
    return torch.stack(videos), prompts


def encode_frames(vae: AutoencoderKLWan, videos: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, int]:
    """Model-space latents [start, end) of `videos` (on any device) from only the frames they and the halo need,
    moved to the VAE's device; and how many video frames the encoder ran over."""
    halo = encoder_halo_latents(vae)
    window = frame_window(start, end, halo)
    frames = videos[:, :, window.start : window.stop].to(next(vae.parameters()).device)
    with torch.no_grad():
        z = encode_range(vae, frames, start, end, halo, frame_offset=window.start, normalized=True)
    return z, window.stop - window.start
