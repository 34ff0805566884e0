"""Triton kernel: NVFP4 KV cache -> compute dtype, one pass (reference twin: `nvfp4.dequantize`).

Input layout (as `NVFP4KVStorage` keeps it): codes uint8 [BH, S, D/2] (low nibble first), E4M3 block scales
viewed as uint8 [BH, S, D/16], one float32 global scale per (BH, frame slot) [BH, S / T]. The first `length`
tokens of every BH row are decoded into out [BH, length, D]. E2M1 and E4M3 are decoded arithmetically (exact in
float32) and multiplied in the reference's order, e2m1 * (global * block), so the result is bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1(code):
    m = code & 7
    e = m >> 1
    frac = (m & 1).to(tl.float32) * 0.5
    mag = tl.where(e == 0, frac, (1.0 + frac) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _e4m3(byte):
    e = (byte >> 3) & 15
    mant = (byte & 7).to(tl.float32) * 0.125
    mag = tl.where(e == 0, mant * 0.015625, (1.0 + mant) * tl.exp2((e - 7).to(tl.float32)))
    return tl.where((byte & 128) != 0, -mag, mag)


@triton.jit
def _kv_dequant_kernel(
    codes_ptr, blocks_ptr, global_ptr, out_ptr, length, s_alloc, slots, tokens_per_frame,
    D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    bh = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_ok = t < length
    c = tl.arange(0, D // 2)  # byte column: elements 2c (low nibble) and 2c + 1 (high nibble)
    in_row = bh.to(tl.int64) * s_alloc + t
    byte = tl.load(codes_ptr + in_row[:, None] * (D // 2) + c[None, :], mask=rows_ok[:, None], other=0).to(tl.int32)
    blk = tl.load(blocks_ptr + in_row[:, None] * (D // 16) + (c // 8)[None, :], mask=rows_ok[:, None], other=0)
    g = tl.load(global_ptr + bh.to(tl.int64) * slots + t // tokens_per_frame, mask=rows_ok, other=0.0)
    scale = g[:, None] * _e4m3(blk.to(tl.int32))
    out_row = bh.to(tl.int64) * length + t
    base = out_ptr + out_row[:, None] * D + 2 * c[None, :]
    dtype = out_ptr.dtype.element_ty
    lo = (_e2m1(byte & 15) * scale).to(dtype, fp_downcast_rounding="rtne")
    hi = (_e2m1(byte >> 4) * scale).to(dtype, fp_downcast_rounding="rtne")
    tl.store(base, lo, mask=rows_ok[:, None])
    tl.store(base + 1, hi, mask=rows_ok[:, None])


def kv_dequantize(
    codes: torch.Tensor, blocks: torch.Tensor, global_scale: torch.Tensor, length: int, tokens_per_frame: int,
    dtype: torch.dtype, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """codes [B, H, S, D/2] uint8, blocks [B, H, S, D/16] (e4m3 or uint8), global_scale [B, H, S/T] float32
    -> [B, H, length, D] in `dtype` (written into `out` when given)."""
    b, h, s_alloc, half = codes.shape
    d = 2 * half
    if out is None:
        out = torch.empty(b, h, length, d, dtype=dtype, device=codes.device)
    block_t = 32
    grid = (b * h, triton.cdiv(length, block_t))
    _kv_dequant_kernel[grid](
        codes, blocks.view(torch.uint8), global_scale, out, length, s_alloc, global_scale.shape[-1],
        tokens_per_frame, D=d, BLOCK_T=block_t,
    )
    return out
