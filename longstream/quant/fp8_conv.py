"""FP8 (E4M3) causal 3x3x3 convolutions of the Wan VAE decoder's residual blocks: the formats and the plain-PyTorch
reference twin of `kernels/fp8_conv.py`.

A residual block runs ``norm -> SiLU -> conv`` twice. In FP8 the norm's output is written as E4M3 codes and the
convolution multiplies E4M3 codes on FP8 tensor cores with float32 accumulation:

- Activation codes: the norm + SiLU output times the float32 reciprocal of ONE static scale per norm,
  ``x_scale = activation_bound / 448``. The bound holds for every input (the normalised vector has unit length,
  so ``|y_c| <= sqrt(C) |gamma_c| + |b_c|``, and SiLU is never below -0.279), so no amax pass is needed and
  nothing saturates; E4M3's range (2^-9..448) keeps the typical values, ~1/sqrt(C) of the bound, in its normal
  range.
- The padded input buffer: uint8 (the E4M3 bytes) ``[B, 2 + T, H + 2, W + 2, C]``, channels innermost. Frames
  0-1 are the causal history (the previous call's last two input frames, zeros at a stream's start), the
  spatial border is zeros; the convolution then needs no bounds checks: output pixel (t, h, w) reads buffer
  frames t..t+2, rows h..h+2, columns w..w+2. Its last two frames are the next call's history (`next_history`).
- Weight codes: ``[O, 27 C]`` E4M3 bytes, K ordered (dt, dh, dw, c), one float32 scale per output channel
  (its amax / 448).
- Output: ``(sum of code products) * x_scale * w_scale[o] + bias[o] (+ residual)``, in float32 before one
  rounding, laid out [B, T, H, W, O].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fp8 import E4M3_MAX

SILU_MIN = 0.2785  # -min over x of x * sigmoid(x) is 0.27846...
HISTORY = 2  # causal frames in front of each call's input


def activation_bound(gamma: torch.Tensor, beta: torch.Tensor | float, norm_scale: float) -> float:
    """An upper bound of |norm (+ SiLU) output| over all inputs: max_c norm_scale |gamma_c| + |beta_c| (>= SiLU's
    negative floor)."""
    g = gamma.detach().float().reshape(-1).abs() * norm_scale
    b = beta.detach().float().reshape(-1).abs() if isinstance(beta, torch.Tensor) else abs(float(beta))
    return max(float((g + b).max()), SILU_MIN)


def e4m3_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 in [-448, 448] -> E4M3 bytes (uint8), round to nearest even."""
    return v.to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes -> their float32 values (exact)."""
    return codes.view(torch.float8_e4m3fn).float()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight [O, C, 3, 3, 3] -> (E4M3 bytes [O, 27 C] with K ordered (dt, dh, dw, c), float32 scale [O])."""
    if weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        raise ValueError(f"expected a 3x3x3 conv weight [O, C, 3, 3, 3], got {tuple(weight.shape)}")
    w = weight.detach().float().permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / E4M3_MAX
    return e4m3_bytes((w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX)), scale


def norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | float, norm_scale: float,
                        silu: bool) -> torch.Tensor:
    """The norm (+ SiLU) in float32 on channels-innermost x [..., C]: x / max(|x|, 1e-12) * norm_scale * gamma
    + beta, without the bf16 roundings between the steps of the bf16 path."""
    xf = x.float()
    inv = 1.0 / torch.sqrt((xf * xf).sum(dim=-1, keepdim=True).clamp_min(1e-24))
    b = beta.float().reshape(-1) if isinstance(beta, torch.Tensor) else float(beta)
    y = xf * inv * norm_scale * gamma.float().reshape(-1) + b
    return F.silu(y) if silu else y


def padded_buffer(codes: torch.Tensor, history: Optional[torch.Tensor]) -> torch.Tensor:
    """Activation codes [B, T, H, W, C] (uint8) and the history [B, 2, H + 2, W + 2, C] (or None: zeros) -> the
    padded input buffer (module docstring)."""
    b, t, h, w, c = codes.shape
    buf = codes.new_zeros(b, HISTORY + t, h + 2, w + 2, c)
    if history is not None:
        buf[:, :HISTORY] = history
    buf[:, HISTORY:, 1:-1, 1:-1] = codes
    return buf


def next_history(buffer: torch.Tensor) -> torch.Tensor:
    """The next call's causal history: the buffer's last two frames, copied (the buffer itself is not kept)."""
    return buffer[:, -HISTORY:].clone()


def norm_silu_quantize_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | float,
                                 norm_scale: float, silu: bool, x_scale: float,
                                 history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, T, H, W, C] -> the padded buffer of its norm (+ SiLU) codes at scale `x_scale`."""
    y = norm_silu_reference(x, gamma, beta, norm_scale, silu)
    return padded_buffer(e4m3_bytes((y * (1.0 / x_scale)).clamp(-E4M3_MAX, E4M3_MAX)), history)


def conv_reference(buffer: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, x_scale: float,
                   bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The FP8 convolution of a padded buffer in float64 on the codes' exact values -> float32 [B, T, H, W, O]."""
    c = buffer.shape[-1]
    x = e4m3_values(buffer).double().permute(0, 4, 1, 2, 3)  # [B, C, 2 + T, H + 2, W + 2]
    w = e4m3_values(w_codes).double().view(w_codes.shape[0], 3, 3, 3, c).permute(0, 4, 1, 2, 3)
    y = F.conv3d(x, w).permute(0, 2, 3, 4, 1) * (x_scale * w_scale.double())
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return y.float()
