"""Fused NVFP4 quantize (1x16 blocks, round to nearest even) in Triton.

Twin: ``longstream.quant.nvfp4.quantize(x)`` (1x16 blocks, RNE). The output is bit-exact with it: the same
float32 operations in the same order, every division an IEEE division (``tl.math.div_rn``; Triton's ``/`` on
float32 is an approximate division on CUDA), the E4M3 rounding of block scales done on the float32 bits (so it
does not depend on a conversion instruction), and the E2M1 rounding by the same threshold comparisons:

    g    = amax / 2688                                     (kernel 1 reduces amax; or g is given)
    s    = clamp((amax_block / 6) / g, 2**-6, 448) -> E4M3 (RNE)
    v    = clamp(x * ((1 / g) / float(s)), -6, 6)
    code = RNE to E2M1 (ties to the even code), sign from signbit(v); packed low nibble first

Two launches when the global scale is computed: an amax reduction (float bits with ``atomic_max``; finite
non-negative floats order like their int32 bits) and the quantize pass. Non-finite inputs are flagged on the
device; ``check_finite=True`` reads the flag back (one host sync) and raises ``ValueError`` as the twin does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import patch_interpreter

from ..nvfp4 import BLOCK, NVFP4Tensor

patch_interpreter()

_AMAX_BLOCK = 4096  # elements per inner step of the amax kernel
_AMAX_STEPS = 8  # inner steps per program: 32K elements, one atomic each
_Q_BLOCK_M = 32
_Q_BLOCK_K = 128


@triton.jit
def _amax_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """out[0] = max(out[0], max |x|) as float32 bits; out[1] = 1 if any element is NaN or Inf."""
    base = tl.program_id(0).to(tl.int64) * (BLOCK * STEPS)
    amax = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.int32)
    for i in range(STEPS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
        finite = a < float("inf")  # False for +Inf and NaN
        amax = tl.maximum(amax, tl.where(finite, a, 0.0))
        bad = tl.maximum(bad, tl.where(finite, 0, 1))
    tl.atomic_max(out_ptr, tl.max(amax, axis=0).to(tl.int32, bitcast=True))
    tl.atomic_max(out_ptr + 1, tl.max(bad, axis=0))


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, s_ptr, g_ptr, g_out_ptr, flag_ptr, d_ptr,
    M, K, stride_xm,
    G_IS_AMAX: tl.constexpr, G_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_CODES: tl.constexpr = True, WRITE_DECODED: tl.constexpr = False,
):
    """One [BLOCK_M, BLOCK_K] tile of x -> packed codes [BLOCK_M, BLOCK_K/2] and scales [BLOCK_M, BLOCK_K/16]
    (WRITE_CODES) and/or the decoded values e2m1 * scale [BLOCK_M, BLOCK_K] without the global scale, [M, K]
    contiguous (WRITE_DECODED; exact in fp16: at most 6 significant bits in [2**-10, 2688])."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    # Non-finite inputs: raise the flag (the host decides whether to read it).
    if not G_IS_AMAX:
        nonfinite = tl.max(tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1), axis=0)
        tl.store(flag_ptr, nonfinite, mask=nonfinite > 0)

    # Global scale, one per row [BLOCK_M]: g itself (per row, or one value for all rows) or, from the amax bits
    # written by _amax_kernel, amax / 2688.
    same = tl.zeros_like(rows)
    if G_IS_AMAX:
        amax = tl.load(g_ptr + same).to(tl.float32, bitcast=True)
        g = tl.math.div_rn(amax, 2688.0)
        tl.store(g_out_ptr + same, g, mask=(tl.arange(0, BLOCK_M) == 0) & (pid_m == 0) & (pid_k == 0))
    elif G_PER_ROW:
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    else:
        g = tl.load(g_ptr + same)
    nonzero = g > 0.0
    g_safe = tl.where(nonzero, g, 1.0)
    inv_g = tl.math.div_rn(1.0, g_safe)

    # Block scales: s = clamp((amax_block / 6) / g, 2^-6, 448), then RNE to E4M3 on the float32 bits.
    xb = tl.reshape(x, (BLOCK_M, BLOCK_K // 16, 16))
    bamax = tl.max(tl.abs(xb), axis=2)
    s = tl.math.div_rn(tl.math.div_rn(bamax, 6.0), g_safe[:, None])
    s = tl.minimum(tl.maximum(s, 0.015625), 448.0)
    u = s.to(tl.uint32, bitcast=True)
    top = (u + 0x7FFFF + ((u >> 20) & 1)) >> 20  # sign(0) | exponent(8) | 3 mantissa bits, rounded to even
    s_q = (top << 20).to(tl.float32, bitcast=True)  # the E4M3 value as float32 (exact)
    s_byte = (top - 960).to(tl.uint8)  # rebias the exponent 127 -> 7: (e - 120) << 3 | m == top - 960

    # Elements: v = clamp(x * ((1/g) / s), -6, 6); E2M1 code by RNE thresholds; sign = signbit(v).
    recip = tl.math.div_rn(inv_g[:, None], s_q)
    v = xb * recip[:, :, None]
    sign = (v.to(tl.int32, bitcast=True) < 0).to(tl.int32)
    a = tl.abs(tl.minimum(tl.maximum(v, -6.0), 6.0))
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    if WRITE_DECODED:  # E2M1 value of mag: 0, 0.5, 1, 1.5 (mag / 2), then 2, 3, 4 (mag - 2), then 6
        e2m1 = tl.where(mag < 4, mag.to(tl.float32) * 0.5, tl.where(mag < 7, (mag - 2).to(tl.float32), 6.0))
        dec = tl.where(sign == 1, -e2m1, e2m1) * s_q[:, :, None]
        dec = tl.reshape(tl.where(nonzero[:, None, None], dec, 0.0), (BLOCK_M, BLOCK_K))
        tl.store(d_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], dec.to(d_ptr.dtype.element_ty), mask=mask)
    if WRITE_CODES:
        code = tl.where(nonzero[:, None, None], mag | (sign << 3), 0)
        lo, hi = tl.split(tl.reshape(code, (BLOCK_M, BLOCK_K // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        half = K // 2
        hcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * half + hcols[None, :], packed,
                 mask=rmask[:, None] & (hcols < half)[None, :])
        nblk = K // 16
        scols = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        tl.store(s_ptr + rows.to(tl.int64)[:, None] * nblk + scols[None, :],
                 tl.where(nonzero[:, None], s_byte, 0), mask=rmask[:, None] & (scols < nblk)[None, :])


def _check_input(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % BLOCK:
        raise ValueError(f"last dim must be a multiple of {BLOCK}, got shape {tuple(x.shape)}")


def _launch_amax(x: torch.Tensor, flag: torch.Tensor) -> None:
    """flag[0] = max |x| as float32 bits, flag[1] = 1 if x holds NaN/Inf (x contiguous; flag zeroed)."""
    n = x.numel()
    _amax_kernel[(triton.cdiv(n, _AMAX_BLOCK * _AMAX_STEPS),)](x, flag, n, BLOCK=_AMAX_BLOCK, STEPS=_AMAX_STEPS,
                                                               num_warps=8)


def nvfp4_quantize_triton(
    x: torch.Tensor,
    *,
    global_scale: Optional[Union[torch.Tensor, float]] = None,
    check_finite: bool = True,
) -> NVFP4Tensor:
    """Triton twin of ``nvfp4.quantize(x, global_scale=global_scale)`` (1x16 blocks, RNE), bit-exact.

    Args:
        x: floating tensor ``[..., K]`` with ``K % 16 == 0`` (on CUDA, or on CPU under ``TRITON_INTERPRET=1``).
        global_scale: precomputed ``amax / 2688``: 0-dim tensor or float, or one per row (shape broadcasting to
            ``[..., 1]``, as the reference allows, e.g. a per-frame scale for the KV cache); default: computed
            from ``x`` on device.
        check_finite: read the device-side NaN/Inf flag (one host sync) and raise ``ValueError`` like the twin;
            also validates a given ``global_scale``. ``False`` keeps the call asynchronous.
    """
    _check_input(x)
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    dev = x.device
    data = torch.empty((*lead, k // 2), dtype=torch.uint8, device=dev)
    scale = torch.empty((*lead, k // BLOCK), dtype=torch.uint8, device=dev)
    flag = torch.zeros(2, dtype=torch.int32, device=dev)  # [amax bits, non-finite flag]
    if x.numel() == 0:
        g = torch.zeros((), dtype=torch.float32, device=dev) if global_scale is None else \
            torch.as_tensor(global_scale, dtype=torch.float32, device=dev).reshape(())
        return NVFP4Tensor(data, scale.view(torch.float8_e4m3fn), g)

    grid = (triton.cdiv(m, _Q_BLOCK_M), triton.cdiv(k, _Q_BLOCK_K))
    if global_scale is None:
        _launch_amax(x2 if x2.is_contiguous() else x2.contiguous(), flag)
        if check_finite and int(flag[1].item()):
            raise ValueError("NVFP4 quantize: input contains NaN or Inf")
        g = torch.empty((), dtype=torch.float32, device=dev)
        _quantize_kernel[grid](x2, data, scale, flag, g, flag[1:], data, m, k, x2.stride(0),
                               G_IS_AMAX=True, G_PER_ROW=False, BLOCK_M=_Q_BLOCK_M, BLOCK_K=_Q_BLOCK_K,
                               num_warps=4)
    else:
        g = torch.as_tensor(global_scale, dtype=torch.float32, device=dev)
        per_row = g.numel() > 1
        if per_row:  # one scale per row, as the reference allows: [..., 1] broadcasting to x.shape[:-1] + (1,)
            if g.ndim != x.ndim or g.shape[-1] != 1 or any(a not in (1, b) for a, b in zip(g.shape, x.shape)):
                raise ValueError(f"global_scale must be a scalar or broadcast to {tuple(lead)} + (1,), "
                                 f"got {tuple(g.shape)}")
            rows_g = g.expand(*lead, 1).reshape(-1).contiguous()
        else:
            g = g.reshape(())
            rows_g = g
        if check_finite and (not bool(torch.isfinite(g).all()) or bool((g < 0).any())):
            raise ValueError("global_scale must be finite and >= 0")
        _quantize_kernel[grid](x2, data, scale, rows_g, rows_g, flag[1:], data, m, k, x2.stride(0),
                               G_IS_AMAX=False, G_PER_ROW=per_row, BLOCK_M=_Q_BLOCK_M, BLOCK_K=_Q_BLOCK_K,
                               num_warps=4)
        if check_finite and int(flag[1].item()):
            raise ValueError("NVFP4 quantize: input contains NaN or Inf")
    return NVFP4Tensor(data, scale.view(torch.float8_e4m3fn), g)


def nvfp4_quantize_decoded_triton(x: torch.Tensor, *, dtype: torch.dtype = torch.float16
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> ``(e2m1 * scale [..., K] in dtype, global scale)``: the values of
    ``nvfp4_quantize_triton(x)`` decoded without their global scale (twin: ``nvfp4.dequantize(q.data, q.scale,
    1.0)``), bit-exact, written by the quantize pass itself instead of packed codes. Asynchronous: NaN/Inf input
    gives unspecified values (no flag is read). The activation side of ``impl="decoded"``.
    """
    _check_input(x)
    decoded = torch.empty(x.shape, dtype=dtype, device=x.device)
    g = torch.zeros((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return decoded, g
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    flag = torch.zeros(2, dtype=torch.int32, device=x.device)  # [amax bits, non-finite flag]
    _launch_amax(x2, flag)
    grid = (triton.cdiv(m, _Q_BLOCK_M), triton.cdiv(k, _Q_BLOCK_K))
    _quantize_kernel[grid](x2, decoded, decoded, flag, g, flag[1:], decoded, m, k, x2.stride(0),
                           G_IS_AMAX=True, G_PER_ROW=False, BLOCK_M=_Q_BLOCK_M, BLOCK_K=_Q_BLOCK_K,
                           WRITE_CODES=False, WRITE_DECODED=True, num_warps=4)
    return decoded, g
