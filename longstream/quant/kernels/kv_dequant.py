"""Triton kernels: quantized KV cache -> compute dtype in one pass (reference twins: `NVFP4KVStorage.read`'s
`nvfp4.dequantize` path and `FP8KVStorage.read`'s float path).

Input layout (as `quant/kv_storage.py` keeps it), per (batch x head) row `bh` of S allocated tokens:
- NVFP4: codes uint8 [BH, S, D/2] (low nibble first), E4M3 block scales as uint8 [BH, S, D/16];
- FP8:   e4m3 codes as uint8 [BH, S, D], or [BH, D, S] (`tokens_last`: the cache's values);
and one float32 scale per (bh, frame slot) [BH, S / T]. The first `length` tokens of every row are decoded into
out [BH, length, D]. Codes are decoded arithmetically (exact in float32) and multiplied in the reference's order
(NVFP4: e2m1 * (global * block); FP8: e4m3 * scale), so results are bit-identical to the reference on a GPU.
Each program decodes a [BLOCK_T, D] tile and writes it with contiguous rows (D need not be a power of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import patch_interpreter

BLOCK_T = 64


@triton.jit
def _e2m1(code):
    m = code & 7
    e = m >> 1
    half = (m & 1).to(tl.float32) * 0.5
    pow2 = (1 << tl.maximum(e - 1, 0)).to(tl.float32)
    mag = tl.where(e == 0, half, (1.0 + half) * pow2)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _e4m3(byte):
    e = (byte >> 3) & 15
    mant = (byte & 7).to(tl.float32) * 0.125
    pow2 = tl.where(e >= 7, (1 << tl.maximum(e - 7, 0)).to(tl.float32),
                    1.0 / (1 << tl.maximum(7 - e, 0)).to(tl.float32))
    mag = tl.where(e == 0, mant * 0.015625, (1.0 + mant) * pow2)
    return tl.where((byte & 128) != 0, -mag, mag)


@triton.jit
def nvfp4_tile(codes_ptr, blocks_ptr, global_ptr, bh, t, length, s_alloc, slots, tokens_per_frame,
               D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """[BT, DP] float32 values of cached tokens `t` of row `bh`: zero past `length` and past D (DP: D rounded up
    to a power of two, as Triton's ranges need)."""
    c = tl.arange(0, DP // 2)
    ok = (t < length)[:, None] & (c < D // 2)[None, :]
    row = bh * s_alloc + t
    byte = tl.load(codes_ptr + row[:, None] * (D // 2) + c[None, :], mask=ok, other=0).to(tl.int32)
    blk = tl.load(blocks_ptr + row[:, None] * (D // 16) + (c // 8)[None, :], mask=ok, other=0).to(tl.int32)
    g = tl.load(global_ptr + bh * slots + t // tokens_per_frame, mask=t < length, other=0.0)
    scale = g[:, None] * _e4m3(blk)
    return tl.reshape(tl.join(_e2m1(byte & 15) * scale, _e2m1(byte >> 4) * scale), (BT, DP))


@triton.jit
def _nvfp4_kernel(codes_ptr, blocks_ptr, global_ptr, out_ptr, length, s_alloc, slots, tokens_per_frame,
                  D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    pair = nvfp4_tile(codes_ptr, blocks_ptr, global_ptr, bh, t, length, s_alloc, slots, tokens_per_frame, D, DP,
                      BT).to(out_ptr.dtype.element_ty)
    d = tl.arange(0, DP)
    ok_out = (t < length)[:, None] & (d < D)[None, :]
    tl.store(out_ptr + (bh * length + t)[:, None] * D + d[None, :], pair, mask=ok_out)


@triton.jit
def _fp8_kernel(codes_ptr, scale_ptr, out_ptr, length, s_alloc, slots, tokens_per_frame,
                D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, TOKENS_LAST: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    d = tl.arange(0, DP)
    ok = (t < length)[:, None] & (d < D)[None, :]
    if TOKENS_LAST:
        where = (bh * D + d)[None, :] * s_alloc + t[:, None]
    else:
        where = (bh * s_alloc + t)[:, None] * D + d[None, :]
    byte = tl.load(codes_ptr + where, mask=ok, other=0).to(tl.int32)
    s = tl.load(scale_ptr + bh * slots + t // tokens_per_frame, mask=t < length, other=0.0)
    val = (_e4m3(byte) * s[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (bh * length + t)[:, None] * D + d[None, :], val, mask=ok)


def nvfp4_kv_dequantize(codes: torch.Tensor, blocks: torch.Tensor, global_scale: torch.Tensor, length: int,
                        tokens_per_frame: int, dtype: torch.dtype) -> torch.Tensor:
    """codes [B, H, S, D/2] uint8, blocks [B, H, S, D/16] (e4m3 or uint8), global_scale [B, H, S/T] float32
    -> [B, H, length, D] in `dtype`."""
    patch_interpreter()
    b, h, s_alloc, half = codes.shape
    out = torch.empty(b, h, length, 2 * half, dtype=dtype, device=codes.device)
    grid = (b * h, triton.cdiv(length, BLOCK_T))
    _nvfp4_kernel[grid](codes, blocks.view(torch.uint8), global_scale, out, length, s_alloc,
                        global_scale.shape[-1], tokens_per_frame, D=2 * half, DP=triton.next_power_of_2(2 * half),
                        BT=BLOCK_T)
    return out


def fp8_kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, length: int, tokens_per_frame: int,
                      dtype: torch.dtype, tokens_last: bool = False) -> torch.Tensor:
    """codes [B, H, S, D], or [B, H, D, S] with `tokens_last` (e4m3 or uint8, contiguous), scale [B, H, S/T] float32
    -> [B, H, length, D] in `dtype`."""
    patch_interpreter()
    if not codes.is_contiguous():
        raise ValueError("fp8 KV dequantize reads contiguous codes")
    b, h, s_alloc, d = codes.shape
    if tokens_last:
        d, s_alloc = s_alloc, d
    out = torch.empty(b, h, length, d, dtype=dtype, device=codes.device)
    grid = (b * h, triton.cdiv(length, BLOCK_T))
    _fp8_kernel[grid](codes.view(torch.uint8), scale, out, length, s_alloc, scale.shape[-1], tokens_per_frame,
                      D=d, DP=triton.next_power_of_2(d), BT=BLOCK_T, TOKENS_LAST=tokens_last)
    return out
