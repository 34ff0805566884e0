"""Triton kernel: attention with both matmuls on E4M3 operands over an FP8 KV cache (reference twin and math:
`longstream.quant.fp8_attention.fp8_attention_reference`).

One program computes a BM x D output tile for one (batch x head) row: it quantizes its queries to E4M3 in
registers (one scale per row), then for each BN-key tile reads the cached E4M3 codes of K and V (V's tile
[D, BN], as the cache keeps the values tokens last) and their frame scales, runs Q8 K8^T and P8 V8 on tensor cores
with float32 accumulation (Hopper's FP8 wgmma, sm_89+), and keeps the online softmax in float32. Under Triton's
interpreter (whose float8 casts are wrong for some values) the same E4M3 values are made by integer arithmetic
(`fp8_quant._e4m3_code`), decoded exactly and multiplied in float32. Divisions round to nearest (`div_rn`) as the
reference's do, so results equal the reference up to summation order (and the rare probability that then rounds
to the other E4M3 neighbour).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import fp8_attention as reference
from . import interpreting, patch_interpreter
from .fp8_quant import E4M3_MAX, _e4m3_code

P_SCALE = tl.constexpr(reference.P_SCALE)

# the fastest of 9 settings on an H200 (bench/kv_attention.py --fp8-configs; bench/RESULTS.md, 2026-12-03)
GPU_CONFIG = dict(block_m=64, block_n=128, num_warps=4, num_stages=2)


@triton.jit
def _e4m3_value(code):
    """E4M3 byte -> its float32 value (exact)."""
    c = code.to(tl.int32)
    exponent = (c >> 3) & 15
    mantissa = (c & 7).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125,  # subnormals: m * 2^-9
                         (8.0 + mantissa) * tl.exp2((exponent - 10).to(tl.float32)))
    return tl.where((c & 128) != 0, -magnitude, magnitude)


@triton.jit
def _to_e4m3(x, HW: tl.constexpr):
    """float32 in [-448, 448] -> E4M3 operand: hardware float8 (GPU) or its exact float32 value (interpreter)."""
    if HW:  # one return: Triton wants the same type from every return, even of a constexpr branch
        y = x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    else:
        y = _e4m3_value(_e4m3_code(x))
    return y


@triton.jit
def _key_tile(q8, k_ptr, ks_ptr, v_ptr, vs_ptr, vis_ptr, bh, start, length, s_alloc, slots, tokens_per_frame, d,
              score_scale, row_max, row_sum, acc, D: tl.constexpr, BN: tl.constexpr, BOUNDS: tl.constexpr,
              HAS_VISIBLE: tl.constexpr, HW: tl.constexpr):
    """One BN-key step of the online softmax; BOUNDS masks the loads past `length` or D (the tail tile, or every
    tile when D is not a power of two), and hidden slots are masked in the scores only (their probabilities are 0,
    so their values count only if not finite, as in the reference). K's tile is read [BN, D] and V's [D, BN] (the
    cache stores the values tokens last): both are K-major operands of FP8 wgmma, so both stream in by
    asynchronous copies."""
    t = start + tl.arange(0, BN)
    slot = t // tokens_per_frame
    k_where = (bh * s_alloc + t)[:, None] * D + d[None, :]
    v_where = (bh * D + d)[:, None] * s_alloc + t[None, :]
    keep = t < length  # all true unless BOUNDS
    if BOUNDS:
        d_ok = d < D
        k_codes = tl.load(k_ptr + k_where, mask=keep[:, None] & d_ok[None, :], other=0.0)
        v_codes = tl.load(v_ptr + v_where, mask=d_ok[:, None] & keep[None, :], other=0.0)
        k_scale = tl.load(ks_ptr + bh * slots + slot, mask=keep, other=0.0)
        v_scale = tl.load(vs_ptr + bh * slots + slot, mask=keep, other=0.0)
    else:
        k_codes = tl.load(k_ptr + k_where)
        v_codes = tl.load(v_ptr + v_where)
        k_scale = tl.load(ks_ptr + bh * slots + slot)
        v_scale = tl.load(vs_ptr + bh * slots + slot)
    if HAS_VISIBLE:
        keep = keep & (tl.load(vis_ptr + slot, mask=keep, other=0) != 0)
        v_scale = tl.where(keep, v_scale, 0.0)
    if HW:  # E4M3 pointers: each load feeds its dot directly, so Triton pipelines it (async copies)
        k8 = k_codes
        v8 = v_codes
    else:
        k8 = _e4m3_value(k_codes)
        v8 = _e4m3_value(v_codes)
    s = tl.dot(q8, tl.trans(k8)) * score_scale[:, None] * k_scale[None, :]
    if BOUNDS or HAS_VISIBLE:
        s = tl.where(keep[None, :], s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(s - safe[:, None])
    correction = tl.exp2(row_max - safe)
    v_ref = tl.maximum(tl.max(v_scale, axis=0), 1e-30)
    p8 = _to_e4m3(p * tl.math.div_rn(v_scale * P_SCALE, v_ref)[None, :], HW)
    acc = acc * correction[:, None] + tl.dot(p8, tl.trans(v8)) * (v_ref / P_SCALE)
    row_sum = row_sum * correction + tl.sum(p, axis=1)
    return new_max, row_sum, acc


@triton.jit
def _fp8_attention_kernel(q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vis_ptr, out_ptr, heads, sq, length, s_alloc,
                          slots, tokens_per_frame, score_factor, sqb, sqh, sqs, sob, soh, sos, D: tl.constexpr,
                          DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_VISIBLE: tl.constexpr,
                          HW: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    q_ok = (m < sq)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + m.to(tl.int64)[:, None] * sqs + d[None, :], mask=q_ok,
                other=0.0).to(tl.float32)
    q_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(q), axis=1), 1e-12), E4M3_MAX)
    q8 = _to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(q, q_scale[:, None]), -E4M3_MAX), E4M3_MAX), HW)
    score_scale = q_scale * score_factor  # log2(e) / sqrt(D) folded in
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    full = (length // BN) * BN  # keys of the tiles whose loads need no mask
    if D != DP:
        full = 0
    for start in range(0, full, BN):
        row_max, row_sum, acc = _key_tile(q8, k_ptr, ks_ptr, v_ptr, vs_ptr, vis_ptr, bh, start, length, s_alloc,
                                          slots, tokens_per_frame, d, score_scale, row_max, row_sum, acc,
                                          D, BN, False, HAS_VISIBLE, HW)
    for start in range(full, length, BN):
        row_max, row_sum, acc = _key_tile(q8, k_ptr, ks_ptr, v_ptr, vs_ptr, vis_ptr, bh, start, length, s_alloc,
                                          slots, tokens_per_frame, d, score_scale, row_max, row_sum, acc,
                                          D, BN, True, HAS_VISIBLE, HW)
    out = tl.math.div_rn(acc, row_sum[:, None])
    tl.store(out_ptr + b * sob + h * soh + m.to(tl.int64)[:, None] * sos + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok)


def fp8_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, v_codes: torch.Tensor,
                  v_scale: torch.Tensor, length: int, tokens_per_frame: int, visible: torch.Tensor | None = None,
                  *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None) -> torch.Tensor:
    """q [B, H, Sq, D]; K codes [B, H, S, D] and V codes [B, H, D, S] (E4M3 or their uint8 view; contiguous),
    scales [B, H, S / T] float32, `visible` [S / T] bool (on q's device) or None: the arguments of
    `fp8_attention_reference`; q may be strided (the transformer's [B, S, H, D] transposed). Returns [B, H, Sq, D]
    in q's dtype, laid out as [B, Sq, H, D], as the transformer reads it back. Tiles and launch settings default to
    GPU_CONFIG (the interpreter: 64 x reference.BLOCK_N)."""
    patch_interpreter()
    b, h, sq, d = q.shape
    if (k_codes.shape[-1] != d or not 1 <= length <= k_codes.shape[2]
            or tuple(v_codes.shape) != (*k_codes.shape[:2], d, k_codes.shape[2])):
        raise ValueError(f"queries of head size {d} against cached codes K {tuple(k_codes.shape)}, "
                         f"V {tuple(v_codes.shape)} (tokens last), length {length}")
    if not (k_codes.is_contiguous() and v_codes.is_contiguous()):
        raise ValueError("FP8 attention reads contiguous cached codes")
    hw = not interpreting()
    if hw and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise RuntimeError("FP8 attention needs E4M3 tensor cores (compute capability 8.9 or newer)")
    cfg = dict(GPU_CONFIG) if hw else dict(block_m=64, block_n=reference.BLOCK_N, num_warps=4, num_stages=1)
    given = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    cfg.update({k: v for k, v in given.items() if v is not None})
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, S, H, D] in memory
    vis = visible.view(torch.uint8) if visible is not None else k_scale
    codes = torch.float8_e4m3fn if hw else torch.uint8  # the interpreter decodes the bytes itself
    grid = (b * h, triton.cdiv(sq, cfg["block_m"]))
    _fp8_attention_kernel[grid](
        q, k_codes.view(codes), k_scale, v_codes.view(codes), v_scale, vis, out, h, sq, length,
        k_codes.shape[2], k_scale.shape[-1], tokens_per_frame, reference.LOG2E / math.sqrt(d), *q.stride()[:3],
        *out.stride()[:3], D=d,
        DP=max(16, triton.next_power_of_2(d)), BM=cfg["block_m"], BN=cfg["block_n"],
        HAS_VISIBLE=visible is not None, HW=hw, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
