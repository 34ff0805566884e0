"""Triton kernel: the FP8 KV cache's write in one pass per frame (reference twin:
`kv_storage.FP8KVStorage.write_reference`).

One program per (batch x head, frame of the written chunk): it reads the frame's T x D values twice (amax, then
quantize; the second read mostly from L2), computes scale = amax / 448 (1 for an all-zero frame; IEEE division,
as the reference), and stores the e4m3 codes of clamp(x / scale, +-448) at the cache rows `index` names (a frame's
rows are consecutive: the first one is read), token-major or, for the values (`TOKENS_LAST`), transposed, and the
scale in its frame slot. The eager path spends five elementwise passes, a reduction and a float32 copy of the
chunk on the same (`bench e2e`, fp8 KV rows). Codes are made as in `fp8_quant`: the hardware conversion on sm_89+,
integer rounding under the interpreter; both round to nearest even, so the bytes equal the reference's. NaN
propagates as in the twin (a frame holding one gets scale 1 and NaN codes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, patch_interpreter
from .fp8_quant import E4M3_MAX, _e4m3_code

BLOCK_T = 32  # tokens per step of a frame


@triton.jit
def _fp8_kv_write_kernel(x_ptr, index_ptr, codes_ptr, scale_ptr, heads, tokens_per_frame, s_alloc, slots,
                         sxb, sxh, sxn, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr,
                         TOKENS_LAST: tl.constexpr, HW_CAST: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    frame = tl.program_id(1)
    b, h = bh // heads, bh % heads
    d = tl.arange(0, DP)
    first = frame * tokens_per_frame  # the frame's first token in x
    rows = x_ptr + b * sxb + h * sxh
    amax = tl.zeros((BT, DP), tl.float32)
    for t0 in range(0, tokens_per_frame, BT):
        t = t0 + tl.arange(0, BT)
        ok = (t < tokens_per_frame)[:, None] & (d < D)[None, :]
        x = tl.load(rows + (first + t).to(tl.int64)[:, None] * sxn + d[None, :], mask=ok, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
    peak = tl.max(tl.max(amax, axis=1), axis=0)
    nan_seen = tl.max(tl.max((amax != amax).to(tl.int32), axis=1), axis=0)  # the reductions drop NaN
    scale = tl.where((peak > 0) & (nan_seen == 0), tl.math.div_rn(peak, E4M3_MAX), 1.0)
    first_row = tl.load(index_ptr + first)  # the frame's cache rows are first_row, first_row + 1, ...
    for t0 in range(0, tokens_per_frame, BT):
        t = t0 + tl.arange(0, BT)
        ok_t = t < tokens_per_frame
        ok = ok_t[:, None] & (d < D)[None, :]
        x = tl.load(rows + (first + t).to(tl.int64)[:, None] * sxn + d[None, :], mask=ok, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), scale)
        v = tl.minimum(tl.maximum(v, -E4M3_MAX, propagate_nan=tl.PropagateNan.ALL), E4M3_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
        if HW_CAST:
            code = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        else:
            code = _e4m3_code(v)
        row = first_row + t
        if TOKENS_LAST:  # [B, H, D, S]: Triton turns the tile so that each store runs along the tokens
            tl.store(codes_ptr + (bh * D + d)[None, :] * s_alloc + row[:, None], code, mask=ok)
        else:
            tl.store(codes_ptr + (bh * s_alloc + row)[:, None] * D + d[None, :], code, mask=ok)
    slot = first_row // tokens_per_frame
    tl.store(scale_ptr + bh * slots + slot, scale)


def fp8_kv_write(x: torch.Tensor, index: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 tokens_per_frame: int, tokens_last: bool = False) -> None:
    """Quantize x [B, H, n, D] (whole frames of `tokens_per_frame` tokens; any float dtype; strided along B, H, n)
    per (batch, head, frame) into `codes` [B, H, S, D], or [B, H, D, S] with `tokens_last` (e4m3, contiguous), at
    the token rows `index` [n] (int64, on x's device; each frame's rows consecutive from a multiple of
    tokens_per_frame, as the cache writes them) and its scale into `scale` [B, H, S / T] float32, as
    `FP8KVStorage.write` does."""
    patch_interpreter()
    b, h, n, d = x.shape
    if n % tokens_per_frame or index.numel() != n:
        raise ValueError(f"fp8 KV write: {n} tokens, {index.numel()} rows, frames of {tokens_per_frame}")
    s_alloc = codes.shape[-1] if tokens_last else codes.shape[2]
    if (not codes.is_contiguous() or not scale.is_contiguous() or tuple(codes.shape[:2]) != (b, h)
            or codes.shape[2 if tokens_last else 3] != d or tuple(scale.shape) != (b, h, s_alloc // tokens_per_frame)):
        raise ValueError(f"fp8 KV write: x {tuple(x.shape)} into codes {tuple(codes.shape)} and scales "
                         f"{tuple(scale.shape)} (contiguous, frames of {tokens_per_frame})")
    if x.stride(-1) != 1:
        x = x.contiguous()
    index = index.contiguous()
    hw = not interpreting() and torch.cuda.get_device_capability(x.device) >= (8, 9)  # e4m3 cvt: sm_89+
    grid = (b * h, n // tokens_per_frame)
    _fp8_kv_write_kernel[grid](
        x, index, codes.view(torch.uint8), scale, h, tokens_per_frame, s_alloc, scale.shape[-1],
        x.stride(0), x.stride(1), x.stride(2), D=d, DP=triton.next_power_of_2(d), BT=BLOCK_T,
        TOKENS_LAST=tokens_last, HW_CAST=hw, num_warps=4)
