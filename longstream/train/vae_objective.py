"""Training the video VAE on the procedural world (`objective: vae`).

Batches are rendered on the fly: example i of step k is `world.sample_clip` with a seed derived from
(seed, k, i), with one or two shots, so a resumed run sees the data an uninterrupted one would. The loss is the
L1 + MSE reconstruction of the video (frames in [-1, 1]) decoded from the posterior MEAN, plus `kl_weight` times
the KL divergence of the diagonal Gaussian posterior from N(0, I), averaged per element: a deterministic
autoencoder whose latent scale the KL term keeps bounded. (Decoding posterior samples, whose std starts at 1,
trained unstably at small scale; generation only ever decodes the mean's model-space image.) Frames may be
random crops of the rendered ones: the VAE is convolutional, and crops keep the object scale at a lower cost.

A clip's first latent frames may stream through the encoder and the decoder without gradient and outside the
loss (`warm`, `draw_warm`: 0 on half the steps, else from 1..`stream_warmup`): the frames trained then sit that
deep in the stream, past the clip start, where the causal convolutions' cached state is what long streaming
decode runs in. (A VAE trained only on clip starts drifts at depth: measured on a 33-frame-trained one, frames
decode with 3x the error after latent frame ~10 on a still scene, both halves to blame. One trained with warm
uniform in 0..28 had the opposite problem: its clip starts, trained on few steps, decoded with 2x the error of
its deep frames.)

The object covers ~4% of a frame, so a plain mean lets the background dominate and the object decodes as a grey
blob: `object_weight` w weighs each pixel of the object (further than `OBJECT_THRESHOLD` from its frame's median
colour, summed over RGB) 1 + w times, and the reconstruction term becomes sum(weight * error) / sum(weight).

L1 + MSE on pixels trains a decoder toward the blurred mean of what a latent could decode to: corners round off,
a triangle turns into a teardrop (docs/embedded.md). `edge_weight` adds the mean absolute difference of the
frames' spatial gradients (`edge_error`), which only a sharp edge in the right place drives to zero.
"""

from __future__ import annotations

import random

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..vae.streaming import causal_conv_count
from ..vae.wan import TEMPORAL_FACTOR, num_latent_frames, num_video_frames
from .video_source import clip_seed
from .world import sample_clip

OBJECT_THRESHOLD = 0.1  # |pixel - frame median| summed over RGB, in [-1, 1] units
DECODE_PIECE = 4  # latent frames per decoder call in training (decode_unclamped)


def draw_warm(stream_warmup: int, generator: torch.Generator) -> int:
    """Leading latent frames a step streams without gradient: 0 (the clip start) on half the steps, else uniform
    in 1..stream_warmup (always 0 when stream_warmup is 0)."""
    device = generator.device
    if stream_warmup == 0 or float(torch.rand((), generator=generator, device=device)) < 0.5:
        return 0
    return int(torch.randint(1, stream_warmup + 1, (), generator=generator, device=device))


def world_videos(seed: int, step: int, micro: int, batch: int, frames: int, size: int, crop: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, 3, frames, S, S] world clips for micro-batch `micro` of step `step`: rendered on `device` at `size`
    pixels, then (with `crop` > 0) cut to a `crop` x `crop` window at a position drawn from the clip's seed
    (S = crop)."""
    clips = []
    for i in range(batch):
        seed_i = clip_seed(seed, step, micro, i)
        video = sample_clip(seed_i, frames, size, shots=1 + seed_i % 2, device=device)[0]
        if crop:
            rng = random.Random(seed_i)
            y, x = rng.randrange(size - crop + 1), rng.randrange(size - crop + 1)
            video = video[:, :, y : y + crop, x : x + crop]
        clips.append(video)
    return torch.stack(clips)


def encode_moments(vae: AutoencoderKLWan, video: torch.Tensor, warm: int = 0) -> torch.Tensor:
    """`vae.encode(video)`'s posterior parameters (quant_conv output) for a clip of 1 + 4k frames, the first `warm`
    latent frames computed without gradient (the first video frame alone, then groups of 4, as diffusers encodes
    without tiling)."""
    cache, out = [None] * causal_conv_count(vae.encoder), []
    groups = [video[:, :, :1]] + list(video[:, :, 1:].split(TEMPORAL_FACTOR, dim=2))
    for i, group in enumerate(groups):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= warm):
            out.append(vae.encoder(group, feat_cache=cache, feat_idx=[0]))
    return vae.quant_conv(torch.cat(out, dim=2))  # a 1x1x1 convolution: per frame


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor, warm: int = 0, piece: int = DECODE_PIECE
                     ) -> torch.Tensor:
    """`vae.decode(z).sample` without its final clamp to [-1, 1], which would zero the gradient of every pixel
    that overshoots, for latent frames `warm` on (the video frames from `num_video_frames(warm)`): the first
    latent frame is decoded alone (a clip start), then calls of `piece` latent frames, those before `warm`
    without gradient. The causal caches carry state and gradient from call to call, so the pieces compute what
    one call would; fixed-size calls keep cuDNN's autotuner (`cudnn.benchmark`) to a few shapes whatever `warm`
    is, where one call per part met a new shape for each `warm`."""
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    x = vae.post_quant_conv(z)
    frames = x.shape[2]
    cache, out = [None] * causal_conv_count(vae.decoder), []
    starts = [0] + list(range(1, min(warm, frames), piece)) + list(range(max(warm, 1), frames, piece))
    for start in starts:
        end = 1 if start == 0 else min(start + piece, frames, warm if start < warm else frames)
        trained = start >= warm
        with torch.set_grad_enabled(torch.is_grad_enabled() and trained):
            part = vae.decoder(x[:, :, start:end], feat_cache=cache, feat_idx=[0], first_chunk=start == 0)
        if trained:
            out.append(part)
    return torch.cat(out, dim=2)


def object_mask(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] True where a pixel of [B, 3, F, H, W] frames is far from its frame's median colour."""
    background = video.flatten(3).median(dim=3).values[..., None, None]
    return (video - background).abs().sum(1, keepdim=True) > OBJECT_THRESHOLD


def edge_error(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the frames' spatial gradients (forward differences along H and W) of
    [B, C, F, H, W] tensors: zero when the edges agree, whatever the flat regions do."""
    d = recon - video
    return (d.diff(dim=3).abs().mean() + d.diff(dim=4).abs().mean()) / 2


def vae_loss(vae: AutoencoderKLWan, video: torch.Tensor, *, kl_weight: float, object_weight: float = 0.0,
             edge_weight: float = 0.0, warm: int = 0) -> torch.Tensor:
    """Reconstruction (object-weighted with `object_weight`) + `edge_weight` * `edge_error` + `kl_weight` * KL, of
    latent frames `warm` on."""
    if not 0 <= warm < num_latent_frames(video.shape[2]):
        raise ValueError(f"warm {warm} leaves no latent frame of a {video.shape[2]}-frame clip to train")
    moments = encode_moments(vae, video, warm)
    # the posterior (its KL) in at least float32, also from bf16 moments under autocast; decoded in the VAE's dtype
    posterior = DiagonalGaussianDistribution(moments.to(torch.promote_types(moments.dtype, torch.float32)))
    recon = decode_unclamped(vae, posterior.mean.to(moments.dtype), warm)
    video = video[:, :, num_video_frames(warm):]  # the frames of latents [warm, ...)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)[:, :, warm:].mean()
    error = (recon - video).abs() + (recon - video).pow(2)
    if object_weight:
        weight = 1.0 + object_weight * object_mask(video).to(error.dtype)
        loss = (error * weight).sum() / (weight.sum() * video.shape[1])
    else:
        loss = error.mean()
    if edge_weight:
        loss = loss + edge_weight * edge_error(recon, video)
    return loss + kl_weight * kl
