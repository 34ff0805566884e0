"""Chunked Wan VAE encode with a left halo (sequence-parallel friendly), and the halo's derivation.

A rank that owns latent frames ``[s, e)`` of a clip encodes them from only the raw frames those latents cover
plus ``halo`` latent frames' worth of earlier frames, with no state shared with other chunks, and gets exactly
what a whole-clip ``vae.encode`` gives for those latents (the distribution's mode, i.e. its mean).

Feeding a chunk (``a = max(0, s - halo - 1)``): raw frames ``[4a, 1 + 4 (e - 1))``. Frame ``4a`` is the last
frame of latent ``a``; the encoder treats it as a clip start (frame alone, then groups of 4), so the groups of
4 that follow are exactly the groups of latents ``a+1, a+2, ...`` in the whole clip: the temporal stride
phases line up. The first ``s - a`` latents (the dummy latent ``a`` and the halo) are dropped. For ``a = 0``
the chunk is a true prefix of the clip and every latent is exact.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AvgDown3D,
    WanAttentionBlock,
    WanCausalConv3d,
    WanEncoder3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanResidualDownBlock,
    WanRMS_norm,
)
from torch import nn

from .wan import TEMPORAL_FACTOR, check_video, normalize, num_latent_frames, vae_param


class FrameWindow(NamedTuple):
    """Raw frames ``[start, stop)`` to encode for a latent range, and how many leading latents to drop."""

    start: int
    stop: int
    drop: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- receptive field tracing -------------------------------------------------------------------------------
# c = the first chunk-local time index (at the current temporal resolution) whose features equal the
# whole-clip features when a chunk starts mid-clip. Every causal op moves c right by its left reach.

_PER_FRAME = (WanRMS_norm, WanAttentionBlock, nn.Identity, nn.Dropout, nn.Conv2d, nn.ZeroPad2d, nn.SiLU)


def _conv_reach(conv: nn.Module) -> int:
    """Left frames a stride-1 causal conv reads: its causal zero padding, (k_t - 1) * dilation_t."""
    if not isinstance(conv, WanCausalConv3d):
        if isinstance(conv, _PER_FRAME):
            return 0
        raise NotImplementedError(f"unknown shortcut module {type(conv).__name__}")
    reach = (conv.kernel_size[0] - 1) * conv.dilation[0]
    if conv.stride[0] != 1 or conv._padding[4] != reach:
        raise NotImplementedError(f"causal conv with stride/padding {conv.stride}/{conv._padding} not understood")
    return reach


def _trace_resblock(block: WanResidualBlock, c: int) -> int:
    main = c + _conv_reach(block.conv1) + _conv_reach(block.conv2)
    return max(main, c + _conv_reach(block.conv_shortcut))


def _trace_resample(block: WanResample, c: int) -> int:
    if block.mode == "downsample2d":
        return c
    if block.mode != "downsample3d":
        raise NotImplementedError(f"encoder resample mode {block.mode!r}")
    # diffusers prepends the previous chunk's last frame and runs a valid (unpadded) conv: local output
    # j >= 1 reads inputs [st*(j-1), st*(j-1) + k_t - 1]; output 0 is the first frame passed through
    # without the time conv (never equal to the whole-clip value mid-clip).
    conv = block.time_conv
    kt, st = conv.kernel_size[0], conv.stride[0]
    if (kt, st) != (3, 2) or conv._padding[4] != 0:
        raise NotImplementedError(f"temporal downsample conv k={kt}, stride={st} not understood")
    return _ceil_div(c, st) + 1


def _trace_avgdown(block: AvgDown3D, c: int) -> int:
    # Groups of factor_t frames, the first group left-padded with zeros: output j >= 1 averages inputs
    # [ft*j - ft + 1, ft*j]; output 0 contains the zero padding.
    ft = block.factor_t
    return c if ft == 1 else max(1, _ceil_div(c + ft - 1, ft))


def _trace(module: nn.Module, c: int) -> int:
    """First exact chunk-local index after ``module``, given the first exact index ``c`` before it."""
    if isinstance(module, WanCausalConv3d):
        return c + _conv_reach(module)
    if isinstance(module, WanResidualBlock):
        return _trace_resblock(module, c)
    if isinstance(module, WanResample):
        return _trace_resample(module, c)
    if isinstance(module, WanResidualDownBlock):
        main = c
        for resnet in module.resnets:
            main = _trace(resnet, main)
        if module.downsampler is not None:
            main = _trace(module.downsampler, main)
        return max(main, _trace_avgdown(module.avg_shortcut, c))
    if isinstance(module, WanMidBlock):
        c = _trace(module.resnets[0], c)
        for attn, resnet in zip(module.attentions, module.resnets[1:]):
            c = _trace(resnet, c if attn is None else _trace(attn, c))
        return c
    if isinstance(module, WanEncoder3d):
        c = _trace(module.conv_in, c)
        for layer in module.down_blocks:
            c = _trace(layer, c)
        c = _trace(module.mid_block, c)
        return _trace(module.conv_out, c)  # norm_out and the nonlinearity are per frame
    if isinstance(module, _PER_FRAME):
        return c
    raise NotImplementedError(f"cannot trace the temporal receptive field of {type(module).__name__}")


def encoder_halo_latents(vae: AutoencoderKLWan) -> int:
    """Smallest left halo (in latent frames) for which chunked encode equals whole-clip encode.

    Derivation (traced from the module structure, nothing hard-coded per model). A chunk starts mid-clip at
    raw frame 4a (see the module docstring); its chunk-local frame 0 stands in for history it cannot see.
    Track ``c``, the first chunk-local index whose features are exact, through the encoder in forward order,
    starting from c = 0 at the raw frames:

    * causal conv with temporal kernel k (stride 1): its left zero padding replaces real history,
      ``c += k - 1`` (3x3x3 convs: +2; 1x1x1 shortcut / quant convs: +0); a residual block takes the max of
      its conv path and its shortcut path;
    * temporal downsample (``downsample3d``: previous chunk's last frame + chunk through a k=3, stride-2 conv;
      output 0 is the passed-through first frame): output j >= 1 reads inputs 2j-2..2j, so
      ``c -> ceil(c / 2) + 1``;
    * Wan2.2 ``AvgDown3D`` shortcut (pairs of frames, first pair zero-padded): ``c -> max(1, ceil((c+1)/2))``;
    * norms, SiLU, spatial convs / resampling, attention (per frame): unchanged.

    The final ``c = L`` is the first exact chunk-local latent. Chunk-local latent 0 is the dummy latent ``a``
    and the requested latent ``s`` sits at local index ``s - a = halo + 1``, so ``halo = max(0, L - 1)``.

    Wan2.1 and Wan2.2 (2 res blocks per level): conv_in 2; level 0 2 blocks -> 10; level 1 -> 18, downsample
    -> 10; level 2 -> 18 -> 10; level 3 -> 18; mid block (2 res blocks) -> 26; conv_out -> 28; L = 28, halo 27
    latent frames (108 raw frames). With 1 res block per level (tiny / test configs): L = 20, halo 19.
    The bound is tight for generic weights (the dependency on frame ``4(s - halo - 1) - 1`` is real), but the
    influence at the edge of the receptive field is small: for default random init it is ~1e-6 relative.
    """
    enc_l = _trace(vae.encoder, 0)
    latent_l = _trace(vae.quant_conv, enc_l)
    return max(0, latent_l - 1)


def frame_window(start_latent: int, end_latent: int, halo_latents: int) -> FrameWindow:
    """Raw frames needed to encode latents ``[start_latent, end_latent)`` with a halo; see the module docstring."""
    if not 0 <= start_latent < end_latent:
        raise ValueError(f"need 0 <= start_latent < end_latent, got [{start_latent}, {end_latent})")
    if halo_latents < 0:
        raise ValueError(f"halo_latents must be >= 0, got {halo_latents}")
    a = max(0, start_latent - halo_latents - 1)
    return FrameWindow(TEMPORAL_FACTOR * a, 1 + TEMPORAL_FACTOR * (end_latent - 1), start_latent - a)


@torch.no_grad()
def encode_whole(vae: AutoencoderKLWan, video: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
    """Whole-clip encode: ``[B, 3, 1+4(F-1), H, W]`` video -> ``[B, z_dim, F, h, w]`` latent mean."""
    check_video(vae, video)
    num_latent_frames(video.shape[2])
    param = vae_param(vae)
    z = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
    return normalize(vae, z) if normalized else z


@torch.no_grad()
def encode_range(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    start_latent: int,
    end_latent: int,
    halo_latents: int | None = None,
    *,
    frame_offset: int = 0,
    normalized: bool = False,
) -> torch.Tensor:
    """Encode latents ``[start_latent, end_latent)`` of a clip from only the frames they and the halo need.

    ``video``: ``[B, 3, T, H, W]`` in [-1, 1] holding clip frames ``[frame_offset, frame_offset + T)``; it must
    include ``frame_window(start_latent, end_latent, halo)`` (a rank may load just that window).
    ``halo_latents=None`` uses ``encoder_halo_latents(vae)`` (exact). Returns ``[B, z_dim, e - s, h, w]``: the
    latent mean (VAE space, or model space with ``normalized=True``). No state is shared between calls.
    """
    check_video(vae, video)
    halo = encoder_halo_latents(vae) if halo_latents is None else halo_latents
    win = frame_window(start_latent, end_latent, halo)
    lo, hi = win.start - frame_offset, win.stop - frame_offset
    if lo < 0 or hi > video.shape[2]:
        raise ValueError(
            f"latents [{start_latent}, {end_latent}) with halo {halo} need clip frames [{win.start}, {win.stop}); "
            f"the video holds [{frame_offset}, {frame_offset + video.shape[2]})"
        )
    z = encode_whole(vae, video[:, :, lo:hi])[:, :, win.drop :]
    return normalize(vae, z) if normalized else z


def _ranges(num_latents: int, chunk_latents: int | Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous latent ranges from a chunk size (last chunk may be shorter) or a list of sizes."""
    if isinstance(chunk_latents, int):
        if chunk_latents <= 0:
            raise ValueError(f"chunk_latents must be positive, got {chunk_latents}")
        sizes = [min(chunk_latents, num_latents - s) for s in range(0, num_latents, chunk_latents)]
    else:
        sizes = list(chunk_latents)
        if any(n <= 0 for n in sizes) or sum(sizes) != num_latents:
            raise ValueError(f"chunk sizes {sizes} must be positive and add up to the clip's {num_latents} latents")
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def encode_chunked(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    chunk_latents: int | Sequence[int] | None = None,
    *,
    latent_ranges: Sequence[tuple[int, int]] | None = None,
    halo_latents: int | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """Encode a whole ``[B, 3, 1+4(F-1), H, W]`` clip chunk by chunk, each chunk from scratch with a halo.

    Chunks: ``chunk_latents`` (latents per chunk, or a list of sizes adding up to F) or explicit contiguous
    ``latent_ranges`` covering ``[0, F)``. Returns ``[B, z_dim, F, h, w]``, equal to ``encode_whole`` when the
    halo is at least ``encoder_halo_latents(vae)`` (the default).
    """
    check_video(vae, video)
    num_latents = num_latent_frames(video.shape[2])
    if (chunk_latents is None) == (latent_ranges is None):
        raise ValueError("pass exactly one of chunk_latents and latent_ranges")
    ranges = _ranges(num_latents, chunk_latents) if latent_ranges is None else [tuple(r) for r in latent_ranges]
    bounds = [b for r in ranges for b in r]
    if not ranges or bounds[0] != 0 or bounds[-1] != num_latents or bounds[1:-1:2] != bounds[2::2]:
        raise ValueError(f"latent_ranges {ranges} must be contiguous and cover [0, {num_latents})")
    halo = encoder_halo_latents(vae) if halo_latents is None else halo_latents
    parts = [encode_range(vae, video, s, e, halo, normalized=normalized) for s, e in ranges]
    return torch.cat(parts, dim=2)
