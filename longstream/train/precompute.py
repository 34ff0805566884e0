"""Latent precomputation: encode video clips with the VAE into a latent dataset (`train/data.py` format).

Each clip is encoded chunk by chunk with the architecture-derived halo (`vae.encode.encode_chunked`), so memory
stays bounded for long clips, and stored as model-space (normalized) latents. The run is resumable: a clip's
latent file is written atomically before its line is appended to `clips.jsonl`, and clips already listed are
skipped, so an interrupted run continues where it stopped without duplicates.

Shot boundaries in video frames map to latent frames: latent 0 holds video frame 0 and latent i > 0 holds frames
[4i - 3, 4i], so a shot starting at video frame a > 0 starts at latent ceil((a - 1) / 4) + 1 - the first latent
made only of its frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from ..vae.encode import encode_chunked
from ..vae.wan import num_latent_frames
from .data import INDEX, write_clip

Clip = tuple[str, torch.Tensor, list[tuple[str, int, int]]]  # name, video [3, F, H, W] in [-1, 1], shots


def latent_start(video_frame: int) -> int:
    return 0 if video_frame == 0 else (video_frame - 1 + 3) // 4 + 1


def done_clips(root: Path) -> set[str]:
    index = root / INDEX
    if not index.is_file():
        return set()
    return {json.loads(line)["file"] for line in index.read_text(encoding="utf-8").splitlines() if line.strip()}


@torch.no_grad()
def encode_clips(
    clips: Iterable[Clip], vae, root: str | Path, *, chunk_latents: int = 8, total: int | None = None,
    progress: bool = True,
) -> int:
    """Encode and store every clip not stored yet; returns how many were encoded now."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = done_clips(root)
    param = next(vae.parameters())
    encoded = 0
    for name, video, shots in tqdm(clips, total=total, unit="clip", disable=not progress):
        file = f"{name}.safetensors"
        if file in done:
            continue
        frames = video.shape[1]
        if (frames - 1) % 4:
            raise ValueError(f"clip {name}: {frames} frames; a causal video VAE needs 1 + 4k")
        latents = encode_chunked(vae, video[None].to(param.device, param.dtype), chunk_latents, normalized=True)[0]
        n = num_latent_frames(frames)
        starts = [latent_start(s) for _, s, _ in shots] + [n]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"clip {name}: a shot is shorter than one latent frame (4 video frames)")
        write_clip(root, name, latents, [(p, a, b) for (p, _, _), a, b in zip(shots, starts, starts[1:])])
        encoded += 1
    return encoded
