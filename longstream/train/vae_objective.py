"""Training the video VAE on the procedural world (`objective: vae`).

Batches are rendered on the fly: example i of step k is `world.sample_clip` with a seed derived from
(seed, k, i), with one or two shots, so a resumed run sees the data an uninterrupted one would. The loss is the
L1 + MSE reconstruction of the video (frames in [-1, 1]) decoded from the posterior MEAN, plus `kl_weight` times
the KL divergence of the diagonal Gaussian posterior from N(0, I), averaged per element: a deterministic
autoencoder whose latent scale the KL term keeps bounded. (Decoding posterior samples, whose std starts at 1,
trained unstably at small scale; generation only ever decodes the mean's model-space image.) Frames may be
random crops of the rendered ones: the VAE is convolutional, and crops keep the object scale at a lower cost.

The object covers ~4% of a frame, so a plain mean lets the background dominate and the object decodes as a grey
blob: `object_weight` w weighs each pixel of the object (further than `OBJECT_THRESHOLD` from its frame's median
colour, summed over RGB) 1 + w times, and the reconstruction term becomes sum(weight * error) / sum(weight).
"""

from __future__ import annotations

import random

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .video_source import clip_seed
from .world import sample_clip

OBJECT_THRESHOLD = 0.1  # |pixel - frame median| summed over RGB, in [-1, 1] units


def world_videos(seed: int, step: int, micro: int, batch: int, frames: int, size: int, crop: int = 0
                 ) -> torch.Tensor:
    """[batch, 3, frames, S, S] world clips for micro-batch `micro` of step `step`: rendered at `size` pixels,
    then (with `crop` > 0) cut to a `crop` x `crop` window at a position drawn from the clip's seed (S = crop)."""
    clips = []
    for i in range(batch):
        seed_i = clip_seed(seed, step, micro, i)
        video = sample_clip(seed_i, frames, size, shots=1 + seed_i % 2)[0]
        if crop:
            rng = random.Random(seed_i)
            y, x = rng.randrange(size - crop + 1), rng.randrange(size - crop + 1)
            video = video[:, :, y : y + crop, x : x + crop]
        clips.append(video)
    return torch.stack(clips)


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` without its final clamp to [-1, 1], which would zero the gradient of every pixel
    that overshoots; the first latent frame is decoded alone (a clip start), the rest in one decoder call."""
    x = vae.post_quant_conv(z)
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    out = [vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)]
    if x.shape[2] > 1:
        out.append(vae.decoder(x[:, :, 1:], feat_cache=cache, feat_idx=[0], first_chunk=False))
    return torch.cat(out, dim=2)


def object_mask(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] True where a pixel of [B, 3, F, H, W] frames is far from its frame's median colour."""
    background = video.flatten(3).median(dim=3).values[..., None, None]
    return (video - background).abs().sum(1, keepdim=True) > OBJECT_THRESHOLD


def vae_loss(vae: AutoencoderKLWan, video: torch.Tensor, *, kl_weight: float, object_weight: float = 0.0
             ) -> torch.Tensor:
    posterior = vae.encode(video).latent_dist
    recon = decode_unclamped(vae, posterior.mean)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    error = (recon - video).abs() + (recon - video).pow(2)
    if object_weight:
        weight = 1.0 + object_weight * object_mask(video).to(error.dtype)
        return (error * weight).sum() / (weight.sum() * video.shape[1]) + kl_weight * kl
    return error.mean() + kl_weight * kl
