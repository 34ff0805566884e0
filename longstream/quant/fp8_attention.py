"""FP8 attention over an FP8 KV cache: both matmuls on E4M3 operands (reference twin of the Triton kernel
`kernels.fp8_attention`).

Operands (the `FP8KVStorage` layout): queries q [B, H, Sq, D] in the compute dtype; keys as E4M3 codes
[B, H, S, D], values as E4M3 codes transposed, [B, H, D, S], each with one float32 scale per (batch, head, frame
slot) [B, H, S / T]; optionally `visible` [S / T] (bool per frame slot: the cache's key mask). The first `length`
cached tokens are attended to, unmasked otherwise.

Math, flash-attention style over key tiles of `block_n` tokens (the tiling is part of the definition: P is
quantized per tile, against the running row maximum), in base 2:
- each query row (token, head) is quantized to E4M3 with scale max(amax, 1e-12) / 448 (round to nearest even);
- S = (q8 K8^T) * q_scale[i] * k_scale[j] * log2(e) / sqrt(D), products of E4M3 values summed in float32;
- with the running row max m: p = 2^(S - m); the value scales fold into P before it is quantized:
  p8 = E4M3(p * v_scale[j] / v_ref * 256), v_ref the tile's largest value scale (p8 <= 256 < 448; where a tile
  is shorter than a frame, as at the 5B model's 880 tokens, it spans at most two frames, and probabilities of a
  frame whose scale is far below the other's lose E4M3 precision); the accumulator adds (p8 V8) * v_ref / 256
  and the row sum the unquantized p;
- out = acc / row sum, in q's dtype.
Against exact attention the error is that of E4M3 queries and probabilities (3 mantissa bits, relative 2^-4
per element): on random unit-variance q, K, V (head size 128, 384 keys) 4.5% relative (Frobenius) at logits of
standard deviation ~1 and 8.2% at ~4, nearly all of it from the queries (the probabilities alone: ~1%).
"""

from __future__ import annotations

import math

import torch

from .fp8 import E4M3_MAX

P_SCALE = 256.0  # probabilities (<= 1) times this stay below E4M3_MAX: a power of two, exact
BLOCK_N = 64  # key tile of the reference and the interpreted kernel
LOG2E = 1.4426950408889634


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """x / scale rounded to E4M3 (nearest even, clamped to +-448), returned as float32 values."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def token_scales(scales: torch.Tensor, length: int, tokens_per_frame: int) -> torch.Tensor:
    """[B, H, frames] per-frame scales -> [B, H, length] per token."""
    frames = -(-length // tokens_per_frame)
    return scales[:, :, :frames].repeat_interleave(tokens_per_frame, dim=2)[:, :, :length].float()


def fp8_attention_reference(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, v_codes: torch.Tensor,
                            v_scale: torch.Tensor, length: int, tokens_per_frame: int,
                            visible: torch.Tensor | None = None, block_n: int = BLOCK_N) -> torch.Tensor:
    """The module docstring's math in float32 PyTorch; returns [B, H, Sq, D] in q's dtype."""
    d = q.shape[-1]
    qf = q.float()
    q_scale = qf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    q8 = quantize_e4m3(qf, q_scale)
    k8, v8 = k_codes[:, :, :length].float(), v_codes[..., :length].transpose(-1, -2).float()
    ks, vs = (token_scales(s, length, tokens_per_frame) for s in (k_scale, v_scale))
    keep = torch.ones(length, dtype=torch.bool, device=q.device)
    if visible is not None:
        keep = visible.repeat_interleave(tokens_per_frame)[:length].to(q.device)
    score_scale = q_scale * (LOG2E / math.sqrt(d))
    row_max = torch.full(qf.shape[:-1], float("-inf"), device=q.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros_like(qf)
    for start in range(0, length, block_n):
        tile = slice(start, min(start + block_n, length))
        s = (q8 @ k8[:, :, tile].transpose(-1, -2)) * score_scale * ks[:, :, None, tile]
        s = s.masked_fill(~keep[tile], float("-inf"))
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        safe = torch.where(new_max == float("-inf"), 0.0, new_max)
        p = torch.exp2(s - safe[..., None])
        correction = torch.exp2(row_max - safe)
        v_ref = torch.where(keep[tile], vs[:, :, tile], 0.0).amax(dim=-1).clamp_min(1e-30)[..., None, None]
        p8 = quantize_e4m3(p * (vs[:, :, None, tile] * (P_SCALE / v_ref)))
        acc = acc * correction[..., None] + (p8 @ v8[:, :, tile]) * (v_ref / P_SCALE)
        row_sum = row_sum * correction + p.sum(dim=-1)
        row_max = new_max
    return (acc / row_sum[..., None]).to(q.dtype)
