"""Triton kernel: attention of queries over an NVFP4 KV cache, dequantizing K and V tiles in registers (the
fused alternative to `kv_dequant.nvfp4_kv_dequantize` into a scratch buffer followed by SDPA; reference twin:
`NVFP4KVStorage.read` then `model.attention.attention`).

Layout as in `kv_dequant`: per (batch x head) row, codes uint8 [S, D/2] (low nibble first), E4M3 block scales
[S, D/16], one float32 scale per frame slot. Queries [B, H, Sq, D] attend to the first `length` cached tokens,
unmasked (a streaming chunk sees its whole cache). One program computes a BLOCK_M x D output tile with the
online softmax of flash attention: per key tile it decodes K and V ([BLOCK_N, D], exact in float32, as the
reference does), rounds them to the query dtype, and accumulates Q K^T and P V on tensor cores in float32.
Results equal the reference up to the summation order of the softmax (not bit for bit).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import patch_interpreter
from .kv_dequant import nvfp4_tile

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _attention_kernel(q_ptr, kc_ptr, kb_ptr, kg_ptr, vc_ptr, vb_ptr, vg_ptr, out_ptr, sq, length, s_alloc, slots,
                      tokens_per_frame, sm_scale, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    q_ok = (m < sq)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + (bh * sq + m)[:, None] * D + d[None, :], mask=q_ok, other=0.0)
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    for start in range(0, length, BN):
        t = start + tl.arange(0, BN)
        k = nvfp4_tile(kc_ptr, kb_ptr, kg_ptr, bh, t, length, s_alloc, slots, tokens_per_frame, D, DP, BN)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * sm_scale
        s = tl.where((t < length)[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        p = tl.exp(s - new_max[:, None])
        correction = tl.exp(row_max - new_max)
        v = nvfp4_tile(vc_ptr, vb_ptr, vg_ptr, bh, t, length, s_alloc, slots, tokens_per_frame, D, DP, BN)
        acc = acc * correction[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        row_max = new_max
    out = acc / row_sum[:, None]
    tl.store(out_ptr + (bh * sq + m)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_ok)


def nvfp4_kv_attention(q: torch.Tensor, k: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       v: tuple[torch.Tensor, torch.Tensor, torch.Tensor], length: int,
                       tokens_per_frame: int) -> torch.Tensor:
    """q [B, H, Sq, D]; k and v as (codes [B, H, S, D/2] uint8, block scales [B, H, S, D/16] e4m3 or uint8,
    frame scales [B, H, S/T] float32), the layout of `NVFP4KVStorage`; attends to the first `length` tokens.
    Returns [B, H, Sq, D] in q's dtype."""
    patch_interpreter()
    b, h, sq, d = q.shape
    if k[0].shape[-1] * 2 != d or length < 1 or length > k[0].shape[2]:
        raise ValueError(f"queries of head size {d} against cached codes {tuple(k[0].shape)}, length {length}")
    q = q.contiguous()
    out = torch.empty_like(q)
    grid = (b * h, triton.cdiv(sq, BLOCK_M))
    _attention_kernel[grid](q, k[0], k[1].view(torch.uint8), k[2], v[0], v[1].view(torch.uint8), v[2], out, sq,
                            length, k[0].shape[2], k[2].shape[-1], tokens_per_frame, 1.0 / math.sqrt(d), D=d,
                            DP=max(16, triton.next_power_of_2(d)), BM=BLOCK_M, BN=BLOCK_N)
    return out
