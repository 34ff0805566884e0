"""Training the video VAE on the procedural world (`objective: vae`).

Batches are rendered on the fly: example i of step k is `world.sample_clip` with a seed derived from
(seed, k, i), with one or two shots, so a resumed run sees the data an uninterrupted one would. The loss is the
L1 + MSE reconstruction of the video (frames in [-1, 1]) decoded from the posterior MEAN, plus `kl_weight` times
the KL divergence of the diagonal Gaussian posterior from N(0, I), averaged per element: a deterministic
autoencoder whose latent scale the KL term keeps bounded. (Decoding posterior samples, whose std starts at 1,
trained unstably at small scale; generation only ever decodes the mean's model-space image.) Frames may be
random crops of the rendered ones: the VAE is convolutional, and crops keep the object scale at a lower cost.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .world import sample_clip


def world_videos(seed: int, step: int, micro: int, batch: int, frames: int, size: int, crop: int = 0
                 ) -> torch.Tensor:
    """[batch, 3, frames, S, S] world clips for micro-batch `micro` of step `step`: rendered at `size` pixels,
    then (with `crop` > 0) cut to a `crop` x `crop` window at a position drawn from the clip's seed (S = crop)."""
    clips = []
    for i in range(batch):
        clip_seed = ((seed * 1_000_003 + step) * 97 + micro) * 1_009 + i
        video = sample_clip(clip_seed, frames, size, shots=1 + clip_seed % 2)[0]
        if crop:
            rng = random.Random(clip_seed)
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


def vae_loss(vae: AutoencoderKLWan, video: torch.Tensor, *, kl_weight: float) -> torch.Tensor:
    posterior = vae.encode(video).latent_dist
    recon = decode_unclamped(vae, posterior.mean)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return F.l1_loss(recon, video) + F.mse_loss(recon, video) + kl_weight * kl
