"""Faster Wan VAE inference with the same math: `accelerate(vae)` swaps layer classes in place.

On CPU, measured on 2 cores (the tiny VAE decoding 128x128 video), two things took 85% of the time:

- `WanRMS_norm` calls `F.normalize` over the channel dim of a 5-D tensor, a slow strided reduction on CPU;
  `FastRMSNorm` computes x * rsqrt(sum x^2) over channels (equal up to float rounding; eps 1e-12 as before).
- PyTorch routes a conv3d to its slow native kernel instead of oneDNN when batch * channels * time * height is
  small (a size heuristic in ATen's `use_mkldnn`), which streaming decode always hits; `FastCausalConv3d` calls
  the oneDNN convolution directly for float32 CPU tensors (10-15x faster on these layers). It has an autograd
  formula, so training uses it too.

Training a VAE on the CPU gains too: a decoder fine-tune step (batch 4, 33 frames of 64x64) took 2.9 s
instead of 5.1 s on 2 cores.

On CUDA (the Wan2.2 VAE decoding 704x1280 on an H200, bench/RESULTS.md), the convolutions run near the bf16
peak but elementwise work took about half the time. The norm, and the SiLU that follows it in residual blocks and
heads (folded into the norm: the owner's `nonlinearity` becomes Identity), run as one compiled kernel
(`longstream.fused`); the causal convs pad space inside the convolution instead of copying the input padded;
`FastDupUp3D` keeps channels-last activations channels-last, and `SubPixelUpConv` runs the decoder's 2x nearest
upsample + 3x3 conv as four 2x2 convs on the small image (2.25x fewer FLOPs in those layers, ~7.5% of the Wan2.2
decoder's, and no upsampled copy in float32). `FastResidualBlock` adds the convs' biases inside the compiled norm
and residual add instead of cuDNN's separate, strided bias pass. Inductor's one-pass versions of `FastDupUp3D`'s
copies and of `SubPixelUpConv`'s bias + phase interleave were slower than these eager ones (bench/RESULTS.md).

Parameters and state dict are unchanged (the new classes subclass diffusers' ones), so `accelerate` can be
applied to any loaded VAE, once. The convolution takes cuDNN's path for non-CPU or non-float32 tensors; the
norm's arithmetic is used everywhere (it upcasts to float32 like diffusers' does for half precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    DupUp3D,
    WanCausalConv3d,
    WanDecoder3d,
    WanEncoder3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)

from .. import fused
from . import fp8 as fp8_blocks


def per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[C] -> [1, C, 1, ...] broadcasting over an `ndim`-D channel-first tensor."""
    return v.view(1, -1, *(1,) * (ndim - 2))


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float, scale: float,
                     silu: bool, shift: torch.Tensor | None = None) -> torch.Tensor:
    """WanRMS_norm over dim 1 (x * rsqrt(sum x^2) * scale * gamma + bias, F.normalize's eps), then SiLU if asked;
    `shift` (per channel) is added to x first: the bias of the convolution before, folded in."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32
    if shift is not None:
        xf = xf + per_channel(shift, x.dim())
    inv = torch.rsqrt((xf * xf).sum(dim=1, keepdim=True).clamp_min(1e-24))  # F.normalize's eps 1e-12, squared
    y = (xf * inv).to(x.dtype) * scale * gamma + bias
    return F.silu(y) if silu else y


class FastRMSNorm(WanRMS_norm):
    then_silu = False  # set on instances whose SiLU `accelerate` folded in

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        if not self.channel_first:
            if shift is not None:
                raise ValueError("a folded conv bias needs a channel-first norm")
            y = super().forward(x)
            return F.silu(y) if self.then_silu else y
        return fused.run(channel_rms_norm, x, self.gamma, self.bias, self.scale, self.then_silu, shift)


def _channels_last(x: torch.Tensor) -> bool:
    """Channels-last (NDHWC / NHWC) in memory and not also plainly contiguous."""
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return not x.is_contiguous() and x.is_contiguous(memory_format=layout)


class FastCausalConv3d(WanCausalConv3d):
    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None, with_bias: bool = True) -> torch.Tensor:
        """diffusers' causal conv; `with_bias=False` leaves the bias out (`FastResidualBlock` adds it later)."""
        bias = self.bias if with_bias else None
        # Time: cached frames, then zeros, in front (as diffusers). Space: the convolution's own zero padding,
        # instead of diffusers' padded copy of the whole input.
        time_pad = self._padding[4]
        if cache_x is not None and time_pad > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            time_pad -= cache_x.shape[2]
        if time_pad > 0:
            x = torch.cat([torch.zeros_like(x[:, :, :1])] * time_pad + [x], dim=2)  # keeps x's memory format
        padding = [0, self._padding[2], self._padding[0]]
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # a 1x1x1 weight is both layouts: then follow x's, so a channels-last stream is not transposed twice
            either = self.weight.is_contiguous(memory_format=torch.channels_last_3d)
            cl = _channels_last(self.weight) or (either and _channels_last(x))
            layout = torch.channels_last_3d if cl else torch.contiguous_format
            return torch.ops.aten.mkldnn_convolution(  # channels-last: ~1.5x on 2 cores at 24 channels
                x.contiguous(memory_format=layout), self.weight.contiguous(memory_format=layout), bias, padding,
                list(self.stride), list(self.dilation), self.groups,
            )
        if _channels_last(self.weight):
            x = x.contiguous(memory_format=torch.channels_last_3d)  # layers like attention return NCDHW
        return F.conv3d(x, self.weight, bias, self.stride, padding, self.dilation, self.groups)


def add_bias_residual(y: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return y + per_channel(bias, y.dim()) + h


def _cached_conv(conv: FastCausalConv3d, x: torch.Tensor, feat_cache: list | None, feat_idx: list[int],
                 with_bias: bool) -> torch.Tensor:
    """A residual block's causal conv with diffusers' cache protocol: the conv reads the cached last frames of the
    previous call's input, and this call's last CACHE_T frames (with the cached one before a single frame) are
    cached for the next."""
    if feat_cache is None:
        return conv(x, with_bias=with_bias)
    idx = feat_idx[0]
    if feat_cache[idx] is not None and feat_cache[idx].dtype == torch.uint8:
        raise RuntimeError("the decoder's cache holds FP8 frames: a bf16 block cannot continue a stream that an FP8 "
                           "block started (gradients switched on mid-stream?); reset the decoder first")
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < CACHE_T and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    out = conv(x, feat_cache[idx], with_bias=with_bias)
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return out


class FastResidualBlock(WanResidualBlock):
    """diffusers' residual block where the norms and causal convs are the fast twins. On the compiled path (CUDA
    inference) conv1's bias goes into norm2's kernel and conv2's into the residual add, one kernel: cuDNN's own
    bias add is a separate strided pass on channels-last outputs (~10% of a 1280x704 decode, bench/RESULTS.md).
    `fold_bias` forces the choice (None: fold where `fused` compiles). With `fp8` (set by `accelerate(fp8=True)` on
    the decoder's blocks) both convolutions run in FP8 where `fp8.usable` says they can (`longstream.vae.fp8`)."""

    fold_bias: bool | None = None
    fp8: bool = False

    def forward(self, x: torch.Tensor, feat_cache: list | None = None,
                feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006  diffusers' signature
        if self.fp8 and fp8_blocks.usable(self, x):
            return fp8_blocks.residual_forward(self, x, feat_cache, feat_idx)
        fold = fused.compiles(x) if self.fold_bias is None else self.fold_bias
        h = self.conv_shortcut(x)
        x = self.nonlinearity(self.norm1(x))
        x = _cached_conv(self.conv1, x, feat_cache, feat_idx, with_bias=not fold)
        x = self.norm2(x, self.conv1.bias) if fold else self.norm2(x)
        x = self.dropout(self.nonlinearity(x))
        x = _cached_conv(self.conv2, x, feat_cache, feat_idx, with_bias=not fold)
        if fold:
            return fused.run(add_bias_residual, x, self.conv2.bias, h)
        return x + h


class FastDupUp3D(DupUp3D):
    """DupUp3D (channel repeat, then channels to time and space) that keeps a channels-last input channels-last.

    diffusers' version permutes an 8-D view into NCDHW order; on a channels-last input at 704x1280 that strided
    copy and the add of its NCDHW result to the channels-last main branch took ~17% of the decode
    (bench/RESULTS.md). Here the channel repeat and the permute run on the NDHWC view, so the copy writes
    channels innermost, and the result is channels-last. Contiguous inputs take diffusers' path.
    """

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        if not _channels_last(x):
            return super().forward(x, first_chunk)
        y = dup_up_channels_last(x, self.repeats, self.out_channels, self.factor_t, self.factor_s)
        return y[:, :, self.factor_t - 1:] if first_chunk else y


def dup_up_channels_last(x: torch.Tensor, repeats: int, out_channels: int, ft: int, fs: int) -> torch.Tensor:
    """`FastDupUp3D`'s body on a channels-last [B, C, T, H, W]: each channel repeated `repeats` times, then the
    channels spread over (ft, fs, fs) sub-positions of time and space, the result channels-last (two copies)."""
    b, _, t, h, w = x.shape
    y = x.permute(0, 2, 3, 4, 1).repeat_interleave(repeats, dim=-1)  # [B, T, H, W, C_out*ft*fs*fs]
    y = y.view(b, t, h, w, out_channels, ft, fs, fs).permute(0, 1, 5, 2, 6, 3, 7, 4).contiguous()
    return y.view(b, t * ft, h * fs, w * fs, out_channels).permute(0, 4, 1, 2, 3)


def _phase_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """A 3-tap kernel axis (`dim`) seen from the low-resolution image after a 2x nearest upsample: output phase 0
    reads low-res offsets (-1, 0) with taps (w0, w1 + w2), phase 1 reads (0, +1) with (w0 + w1, w2). Stacked as a
    new leading phase axis; `dim` becomes 2 taps long."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)])


class SubPixelUpConv(torch.nn.Sequential):
    """Wan's upsampler body, `Sequential(WanUpsample(2x, nearest-exact), Conv2d(3x3, padding 1))`, computed on the
    small image: output pixel (2i + a, 2j + b) only sees low-res rows i - 1 + a, i + a and columns j - 1 + b, j + b,
    so each of the 4 phases (a, b) is a 2x2 conv whose taps are sums of the 3x3 ones. One conv with the 4 phase
    kernels stacked on the output channels (padding 1, output (h+1) x (w+1)), then each phase's (h, w) window goes
    to its interleaved place. Same children and state dict as the Sequential it replaces; equal up to float
    rounding (the tap sums are formed in float32)."""

    def _phase_conv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The 4 phase kernels stacked on the output channels [4 O, C, 2, 2] and their bias; kept between
        calls for inference and rebuilt when the weights change (an in-place update, which bumps their version,
        or new storage), and on every call while recording gradients."""
        conv = self[1]
        key = tuple((t._version, t.data_ptr(), t.dtype) for t in (conv.weight, conv.bias) if t is not None)
        cached = getattr(self, "_phases", None)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1], cached[2]
        w = conv.weight.to(torch.promote_types(conv.weight.dtype, torch.float32))  # [O, C, 3, 3]
        kernels = _phase_taps(_phase_taps(w, 2), 4).transpose(0, 1)  # [2 (a), 2 (b), O, C, 2, 2]
        kernel = kernels.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(conv.weight.dtype)
        if _channels_last(conv.weight):
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        bias = None if conv.bias is None else conv.bias.repeat(4)
        if not torch.is_grad_enabled():
            self._phases = (key, kernel, bias)
        return kernel, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, bias = self._phase_conv()
        n, _, h, wd = x.shape
        o = kernel.shape[0] // 4
        y = F.conv2d(x, kernel, bias, padding=1).view(n, 2, 2, o, h + 1, wd + 1)
        if y.stride(3) == 1 and not y.is_contiguous():  # channels-last: [n, i, a, j, b, o] in memory
            out = y.new_empty(n, h, 2, wd, 2, o).permute(0, 5, 1, 2, 3, 4)
        else:
            out = y.new_empty(n, o, h, 2, wd, 2)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, :, a, :, b] = y[:, a, b, :, a:a + h, b:b + wd]
        return out.reshape(n, o, 2 * h, 2 * wd)  # a view in either layout


def _is_upsample_body(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Sequential and len(module) == 2 and type(module[0]) is WanUpsample
            and module[0].scale_factor == (2.0, 2.0) and module[0].mode == "nearest-exact"
            and type(module[1]) is torch.nn.Conv2d and module[1].kernel_size == (3, 3)
            and module[1].padding == (1, 1) and module[1].stride == (1, 1) and module[1].groups == 1)


def accelerate(vae: AutoencoderKLWan, *, channels_last: bool = False, sub_pixel: bool = True,
               fp8: bool = False) -> AutoencoderKLWan:
    """Swap the VAE's RMS norms, causal convs, residual blocks, DupUp3D and (with `sub_pixel`) its upsamplers'
    upsample + conv for the faster twins above and fold the SiLU that follows a norm into it (in place); returns
    `vae`.

    `channels_last=True` also stores the conv weights channels-last (NDHWC / NHWC), the layout cuDNN's bf16
    tensor-core convolutions run in without transposing, and oneDNN's float32 CPU ones run ~1.5x faster in at the
    embedded model's 12-24 channels; `StreamingDecoder` then feeds the decoder the same layout (see
    `memory_format`). Same math.

    `fp8=True` runs the decoder's residual-block convolutions in FP8 (E4M3) for inference on Hopper
    (`longstream.vae.fp8`; the encoder stays as it is): not the same math, ~2% of error a convolution
    (bench/RESULTS.md).
    """
    for module in vae.modules():
        if type(module) is WanRMS_norm:
            module.__class__ = FastRMSNorm
        elif type(module) is WanCausalConv3d:
            module.__class__ = FastCausalConv3d
        elif type(module) is DupUp3D:
            module.__class__ = FastDupUp3D
        elif sub_pixel and type(module) is WanResample and _is_upsample_body(module.resample):
            module.resample.__class__ = SubPixelUpConv
    for module in vae.modules():  # the SiLU after these norms goes into them
        norms = {WanResidualBlock: ("norm1", "norm2"), WanEncoder3d: ("norm_out",), WanDecoder3d: ("norm_out",)}
        names = norms.get(type(module), ())
        if names and isinstance(module.nonlinearity, torch.nn.SiLU):
            for name in names:
                getattr(module, name).then_silu = True
            module.nonlinearity = torch.nn.Identity()
    for module in vae.modules():  # after the SiLU fold, which matches diffusers' class
        if type(module) is WanResidualBlock and module.conv1.bias is not None and module.conv2.bias is not None:
            module.__class__ = FastResidualBlock
    for module in vae.decoder.modules():
        if isinstance(module, FastResidualBlock):
            module.fp8 = fp8
    if channels_last:
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                layout = torch.channels_last_3d if module.weight.dim() == 5 else torch.channels_last
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
    return vae


def channels_last_pays(vae: AutoencoderKLWan) -> bool:
    """Whether `accelerate(channels_last=True)` is measured faster for the VAE where its weights are: on the CPU
    (oneDNN's float32 convolutions, ~1.5x on 2 cores) and on CUDA in bf16 (cuDNN's tensor-core layout); float32 on
    CUDA keeps NCDHW (not measured channels-last)."""
    weight = next(vae.parameters())
    return weight.device.type == "cpu" or (weight.device.type == "cuda" and weight.dtype == torch.bfloat16)


def memory_format(vae: AutoencoderKLWan) -> torch.memory_format:
    """The layout the decoder's input should have: channels-last after `accelerate(channels_last=True)`."""
    weight = vae.decoder.conv_in.weight
    if _channels_last(weight):
        return torch.channels_last_3d
    return torch.contiguous_format
