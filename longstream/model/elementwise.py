"""The transformer block's elementwise steps: norms, adaLN modulation, RoPE, gated residuals.

Written eagerly, each is a chain of float32 passes over [tokens, dim] (at 5B on an H200 they took about a third
of a chunk's GPU time, more than the fp8 linears: bench/RESULTS.md). The block calls them through
`longstream.fused.run`, which compiles them on CUDA (one kernel each); these eager functions are the reference
twins (tests/test_elementwise.py compares them on the GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope

def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim computed in float32 (as Wan does), returned in x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


def modulated_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm(x) * (1 + scale) + shift in float32 (scale, shift float32, broadcast), in x's dtype."""
    return (F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in float32 (gate float32, broadcast), in x's dtype."""
    return (x.float() + y.float() * gate).to(x.dtype)


def rms_norm_rope(y: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """Query/key path: RMSNorm (nn.RMSNorm's) over the last dim of y [B, S, D], split into heads [B, S, H, Dh],
    then RoPE by cos/sin [S, Dh / 2] (`apply_rope`)."""
    normed = F.rms_norm(y, y.shape[-1:], weight, eps)
    return apply_rope(normed.unflatten(-1, (heads, -1)), cos, sin)

