"""The VAE decoder's residual blocks with FP8 (E4M3) convolutions: `accelerate(vae, fp8=True)`.

A residual block's two causal 3x3x3 convolutions are most of a Wan decoder's FLOPs. Here each runs as
`norm_silu_fp8_triton` (the norm + SiLU writes E4M3 codes into the padded input buffer) and `fp8_conv3d_triton`
(an implicit GEMM on FP8 tensor cores, bias and residual in its epilogue); formats in `longstream.quant.fp8_conv`.
The causal cache holds each convolution's E4M3 history frames instead of bf16 ones, under diffusers' cache
protocol (one `feat_cache` slot per convolution, in the same order). A block whose channels the kernel cannot
run, or a device without it, takes the bf16 path. The E4M3 scales follow the weights (kept until those change);
after changing weights, reset the decoder, whose cached history was written at the old scales.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from ..quant import fp8_conv as formats
from ..quant.kernels import interpreting, triton_available


def _version(t: torch.Tensor) -> int:
    """In-place updates so far (-1 for inference tensors, which keep no count and cannot be updated outside
    inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _memo(module: torch.nn.Module, tensors: tuple, make: Callable[[], tuple]) -> tuple:
    """`make()` kept on `module` until one of `tensors` is updated in place or replaced by another tensor."""
    tensors = tuple(t for t in tensors if isinstance(t, torch.Tensor))
    cached = getattr(module, "_fp8_memo", None)
    if cached is None or len(cached[0]) != len(tensors) or any(
            ref() is not t or version != _version(t) for (ref, version), t in zip(cached[0], tensors)):
        cached = (tuple((weakref.ref(t), _version(t)) for t in tensors), make())
        module._fp8_memo = cached
    return cached[1]


def weight_codes(conv: torch.nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv's E4M3 weight codes [O, 27 C] and scales [O] (`formats.quantize_weight`), kept between calls."""
    return _memo(conv, (conv.weight,), lambda: formats.quantize_weight(conv.weight))


def activation_scale(norm: torch.nn.Module) -> float:
    """The static E4M3 scale of a norm's (+ SiLU's) output: `formats.activation_bound` / 448."""
    return _memo(norm, (norm.gamma, norm.bias),
                 lambda: (formats.activation_bound(norm.gamma, norm.bias, norm.scale) / formats.E4M3_MAX,))[0]


def usable(block: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `block` (a FastResidualBlock) can run in FP8 on x's device: Triton's kernels there (CUDA sm_90 /
    sm_100, or the interpreter), both convolutions 3x3x3 with channel counts the kernel takes, no grad."""
    if torch.is_grad_enabled() or not triton_available() or (x.device.type == "cpu" and not interpreting()):
        return False
    from ..quant.kernels.fp8_conv import supported

    convs = (block.conv1, block.conv2)
    return all(c.kernel_size == (3, 3, 3) and c.stride == (1, 1, 1) and c.dilation == (1, 1, 1) and c.groups == 1
               and tuple(c._padding) == (1, 1, 1, 1, 2, 0) and supported(c.in_channels, x.device)
               for c in convs) and all(n.channel_first for n in (block.norm1, block.norm2))


def _channels_innermost(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> its contiguous [B, T, H, W, C] (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 4, 1).contiguous()


def _history(feat_cache: list | None, feat_idx: list[int]) -> torch.Tensor | None:
    if feat_cache is None:
        return None
    cached = feat_cache[feat_idx[0]]
    if cached is not None and cached.dtype != torch.uint8:
        raise RuntimeError("the decoder's cache holds bf16 frames: an FP8 block cannot continue a stream that a "
                           "bf16 block started; reset the decoder first")
    return cached


def _remember(feat_cache: list | None, feat_idx: list[int], buffer: torch.Tensor) -> None:
    if feat_cache is not None:
        feat_cache[feat_idx[0]] = formats.next_history(buffer)
        feat_idx[0] += 1


def residual_forward(block: torch.nn.Module, x: torch.Tensor, feat_cache: list | None,
                     feat_idx: list[int]) -> torch.Tensor:
    """FastResidualBlock's forward with both convolutions in FP8 (module docstring); returns [B, O, T, H, W]
    channels-last, in x's dtype."""
    from ..quant.kernels.fp8_conv import fp8_conv3d_triton, norm_silu_fp8_triton

    silu = isinstance(block.nonlinearity, torch.nn.SiLU)
    h = _channels_innermost(block.conv_shortcut(x))
    y = _channels_innermost(x)
    for norm, conv, residual in ((block.norm1, block.conv1, None), (block.norm2, block.conv2, h)):
        x_scale = activation_scale(norm)
        buffer = norm_silu_fp8_triton(y, norm.gamma, norm.bias, norm.scale, silu or norm.then_silu, x_scale,
                                      history=_history(feat_cache, feat_idx))
        _remember(feat_cache, feat_idx, buffer)
        codes, scales = weight_codes(conv)
        # promote=False: the tensor cores' own accumulator over all K steps, 1.0-2.4e-3 error against FP8's ~2%
        # rounding, and 58 ms less a 5B chunk (bench/RESULTS.md)
        y = fp8_conv3d_triton(buffer, codes, scales, x_scale, bias=conv.bias, residual=residual, out_dtype=x.dtype,
                              promote=False)
    return y.permute(0, 4, 1, 2, 3)
