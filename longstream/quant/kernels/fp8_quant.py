"""Triton kernel: rowwise FP8 E4M3 quantize in one pass (reference twin: `fp8.quantize_rowwise`).

One program per row holds the whole row in registers: amax, scale = max(amax, 1e-12) / 448 (IEEE division, as
the reference divides by a tensor), q = clamp(x / scale, +-448) -> e4m3, rounded to nearest even. On the GPU the
hardware conversion (cvt.rn.satfinite to e4m3, sm_89+) makes the code; under Triton's interpreter, whose float8
cast is wrong for some values, integer arithmetic on the float32 bits does (subnormals and signed zero included):
the two are the same function, and the hardware path is ~20 integer operations an element cheaper. Rows up to
32768.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, patch_interpreter

E4M3_MAX = tl.constexpr(448.0)
AMAX_EPS = tl.constexpr(1e-12)


@triton.jit
def _e4m3_code(v):
    """float32 in [-448, 448] -> e4m3fn byte, round to nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(v)
    abits = a.to(tl.int32, bitcast=True)
    rounded = abits + 0x7FFFF + ((abits >> 20) & 1)  # RNE to 3 mantissa bits; carries into the exponent
    normal = (((rounded >> 23) - 127 + 7) << 3) | ((rounded >> 20) & 7)
    y = a * 512.0  # subnormal steps of 2^-9, exact
    f = tl.floor(y)
    r = y - f
    up = (r > 0.5) | ((r == 0.5) & ((f.to(tl.int32) & 1) == 1))
    sub = f.to(tl.int32) + up.to(tl.int32)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.uint8)


@triton.jit
def _fp8_rowwise_kernel(x_ptr, q_ptr, scale_ptr, k, stride_x, BLOCK_K: tl.constexpr, HW_CAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < k
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), E4M3_MAX)
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -E4M3_MAX), E4M3_MAX)
    if HW_CAST:
        code = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:
        code = _e4m3_code(v)
    tl.store(q_ptr + row * k + cols, code, mask=ok)
    tl.store(scale_ptr + row, scale)


def _warps_for(block: int) -> int:
    """Warps for a program holding `block` elements, 32 values per thread (4 warps gave the 5B FFN's 16384-wide
    rows 128 per thread; the kernel averaged ~0.8 TB/s in a 5B chunk's profile, bench/RESULTS.md)."""
    return max(4, min(32, block // 1024))


def fp8_quantize_rowwise_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scale [..., 1]); no NaN/Inf check (the call stays asynchronous)."""
    patch_interpreter()
    *lead, k = x.shape
    if k > 32768:
        raise ValueError(f"rowwise FP8 kernel handles rows up to 32768 elements, got {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(k)
        hw_cast = not interpreting() and torch.cuda.get_device_capability(x.device) >= (8, 9)  # e4m3 cvt: sm_89+
        _fp8_rowwise_kernel[(x2.shape[0],)](x2, q, scale, k, x2.stride(0), BLOCK_K=block, HW_CAST=hw_cast,
                                            num_warps=_warps_for(block))
    return q.view(torch.float8_e4m3fn).reshape(*lead, k), scale.reshape(*lead, 1)
