"""`longstream world`: render procedural-world clips and encode them into a latent dataset (`data.py` format).

Steps, all resumable:
0. settings: `world.json` records what the folder is made from (written atomically); it binds once the folder
   holds data (the VAE file or the index), so a run interrupted before that leaves no constraint behind;
1. latent statistics: the per-channel mean and std of the VAE's posterior means over the first `stats_clips`
   clips; the VAE is written with them to `OUT/vae.safetensors` (these statistics define "model space", so
   every later stage and generation uses this file);
2. clips `clip_00000` .. : rendered (`world.sample_clip`, seed = clip number + `seed`), encoded in batches with
   that VAE into model-space latents, each written atomically before its index line (clips already indexed are
   skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from tqdm import tqdm

from ..paths import write_text_atomic
from ..vae import encode_chunked, num_latent_frames
from ..vae.checkpoints import load_vae, save_vae
from ..vae.fast import accelerate, channels_last_pays
from .data import INDEX, DataError, write_clip
from .precompute import done_clips
from .world import sample_clip

VAE_FILE = "vae.safetensors"
SETTINGS_FILE = "world.json"  # what the folder was made from: a later call must ask for the same


def _check_settings(out: Path, settings: dict) -> None:
    """Record `settings` in a folder without data yet; in one with data, refuse different settings (one line)."""
    path = out / SETTINGS_FILE
    if not ((out / VAE_FILE).exists() or (out / INDEX).exists()):
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
        return
    if not path.is_file():
        raise DataError(f"{out}: a dataset folder without {SETTINGS_FILE}; use a new folder")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # bad JSON or UTF-8
        stored = None
    if not isinstance(stored, dict):
        raise DataError(f"{path}: unreadable (not a JSON object of settings); use a new folder")
    diff = [k for k in settings if stored.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise DataError(f"{out}: made with {k}={stored.get(k)!r}, now {k}={settings[k]!r}; use a new folder to "
                        "change it")


def _render(first: int, count: int, frames: int, size: int, seed: int, device: torch.device | str
            ) -> tuple[torch.Tensor, list[str]]:
    clips = [sample_clip(seed + i, frames, size, device=device) for i in range(first, first + count)]
    return torch.stack([video for video, _ in clips]), [shots[0][0] for _, shots in clips]


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, clips: int, frames: int, size: int, seed: int, batch: int = 16
                      ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means (VAE space) over `clips` world clips."""
    param = next(vae.parameters())
    total = total_sq = None
    count = 0
    for first in range(0, clips, batch):
        video, _ = _render(first, min(batch, clips - first), frames, size, seed, param.device)
        z = vae.encode(video.to(param.dtype)).latent_dist.mean.double()
        s, sq = z.sum(dim=(0, 2, 3, 4)), (z * z).sum(dim=(0, 2, 3, 4))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += z.numel() // z.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _fast(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """The VAE's fast path (same math, state dict unchanged), channels-last where that pays (on the CPU: 1.46x on 2
    cores for the world stage)."""
    return accelerate(vae, channels_last=channels_last_pays(vae))


def build_world_dataset(vae_path: str | Path, out: str | Path, *, clips: int, frames: int, size: int = 128,
                        seed: int = 0, stats_clips: int = 64, batch: int = 16, device: str | torch.device = "cpu",
                        progress: bool = True) -> Path:
    """Write (or complete) the dataset folder `out`; returns it. `frames` = 1 + 4k video frames per clip."""
    num_latent_frames(frames)  # validates 1 + 4k
    out, source = Path(out), Path(vae_path)
    if source.is_dir():
        raise DataError(f"{source} is a folder, not a VAE file (give the model.safetensors of a vae run)")
    if not source.is_file():
        raise DataError(f"{source}: no such VAE file")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a dataset folder")
    fresh = not (out / VAE_FILE).is_file()
    if fresh:  # load (and so check) the VAE before the folder is made and its settings fixed
        vae = _fast(load_vae(source, device=device))
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, {"vae": str(source.resolve()), "vae_bytes": source.stat().st_size,
                          "vae_mtime_ns": source.stat().st_mtime_ns, "frames": frames, "size": size, "seed": seed,
                          "stats_clips": stats_clips})
    if fresh:
        mean, std = latent_statistics(vae, stats_clips, frames, size, seed)
        save_vae(vae, out / VAE_FILE, latents_mean=mean, latents_std=std)
    vae = _fast(load_vae(out / VAE_FILE, device=device))
    done = done_clips(out)
    with torch.no_grad(), tqdm(total=clips, unit="clip", disable=not progress, desc="encode") as bar:
        for first in range(0, clips, batch):
            count = min(batch, clips - first)
            names = [f"clip_{i:05d}" for i in range(first, first + count)]
            if all(f"{n}.safetensors" in done for n in names):
                bar.update(count)
                continue
            video, prompts = _render(first, count, frames, size, seed, device)
            latents = encode_chunked(vae, video, num_latent_frames(frames), normalized=True).cpu()
            for name, z, prompt in zip(names, latents, prompts):
                if f"{name}.safetensors" not in done:
                    write_clip(out, name, z, [(prompt, 0, z.shape[1])])
            bar.update(count)
    return out
