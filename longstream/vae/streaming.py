"""Streaming Wan VAE decode: decode latent chunks one after another with a persistent causal-conv cache.

diffusers' ``AutoencoderKLWan.decode`` runs the decoder one latent frame at a time while its causal convs keep
the last frames of their inputs in a feature cache, but it clears that cache at entry and exit. Here the cache
lives in the ``StreamingDecoder`` object, so chunk after chunk continues the same video; concatenated, the
outputs equal ``vae.decode(all_latents).sample``. Relies on diffusers internals (``decoder(x, feat_cache,
feat_idx, first_chunk)``, ``unpatchify``), hence the pinned diffusers version and the equality tests.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from .fast import memory_format
from .wan import check_latents, denormalize, num_video_frames, vae_param


def causal_conv_count(module: torch.nn.Module) -> int:
    """Slots of a Wan encoder's or decoder's feature cache: one per causal conv (``feat_cache=[None] * n``)."""
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class StreamingDecoder:
    """Decode one video chunk by chunk.

    ``decode(latents)`` takes ``[B, z_dim, F, h, w]`` latents (VAE space, as ``vae.decode`` takes them, or model
    space with ``normalized=True``) and returns the ``[B, 3, F', H, W]`` frames in ``[-1, 1]`` that the chunk
    completes: ``F' = 1 + 4 (F - 1)`` for the first chunk of a video, ``4 F`` afterwards. ``reset()`` starts a
    new video. Several decoders may share one VAE (each owns its cache; the VAE's own cache is untouched).

    ``frames_per_call`` latent frames go through the decoder at once (after the video's first frame, which
    is always alone): 1 reproduces diffusers' computation exactly; larger values are faster (notably on CPU)
    and agree up to float rounding, at the cost of activation memory proportional to it.

    Not thread-safe; if ``decode`` raises midway, the cache is undefined: call ``reset()``.
    """

    def __init__(self, vae: AutoencoderKLWan, *, normalized: bool = False, frames_per_call: int = 1) -> None:
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        self.vae = vae
        self.normalized = normalized
        self.frames_per_call = frames_per_call
        self._num_convs = causal_conv_count(vae.decoder)
        self.reset()

    def reset(self) -> None:
        """Forget the previous video: the next chunk is decoded as a video start."""
        self._cache: list = [None] * self._num_convs
        self._latents_seen = 0
        self._shape: tuple[int, int, int] | None = None  # (B, h, w) of the current video

    @property
    def latents_seen(self) -> int:
        """Latent frames decoded since the last reset."""
        return self._latents_seen

    @property
    def frames_emitted(self) -> int:
        """Raw frames returned since the last reset."""
        return num_video_frames(self._latents_seen)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, normalized: bool | None = None) -> torch.Tensor:
        """Frames completed by ``latents`` (see the class docstring for formats)."""
        check_latents(self.vae, latents)
        if latents.shape[2] == 0:
            raise ValueError("empty latent chunk (0 frames)")
        shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"chunk has (batch, h, w) = {shape} but this video started with {self._shape}; call reset() first"
            )
        if self.normalized if normalized is None else normalized:
            latents = denormalize(self.vae, latents)
        param = vae_param(self.vae)
        x = self.vae.post_quant_conv(latents.to(param.device, param.dtype))
        x = x.contiguous(memory_format=memory_format(self.vae))

        outs = []
        start = 0
        if self._latents_seen == 0:  # the video's first latent frame: decoded alone, as a clip start
            outs.append(self._run(x[:, :, :1], first=True))
            start = 1
        for i in range(start, x.shape[2], self.frames_per_call):
            outs.append(self._run(x[:, :, i : i + self.frames_per_call], first=False))
        out = torch.cat(outs, dim=2)

        if self.vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        self._shape = shape
        self._latents_seen += latents.shape[2]
        return out.clamp(-1.0, 1.0)

    def _run(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        # feat_idx restarts at 0 every call: each causal conv finds its own cache slot in forward order.
        return self.vae.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=first)
