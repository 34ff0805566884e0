"""NVFP4 W4A4 GEMM with the weights as the tensor cores' register operand (experiment, `bench/gemm.py` columns
``rs`` and ``rs+q``; not used by the model until it measures faster than ``nvfp4_gemm``).

``C[M, N] = A[M, K] @ B[N, K]^T`` is computed as ``C^T = B A^T`` tile by tile: B (the weights) is decoded in
registers each K step (``nvfp4_gemm._decode_tile_asm`` in natural K order, ``e2m1 * scale * 2**-7`` in fp16)
and fed to wgmma from registers, while A arrives already decoded (``e2m1 * scale`` in fp16, exact: at most 6
significant bits in [2**-10, 2688]) and streams into shared memory with asynchronous copies. In ``nvfp4_gemm``
both operands are decoded in registers and stored to shared memory before each wgmma, which then has to
finish before the next decode; here the full K steps' decode has no shared-memory round trip and up to 3
wgmmas stay in flight (sm_90 compile of the main loop, checked in `tests/test_kernels_compile.py`). Cost: A's
decode is a separate pass (``nvfp4_dequantize_triton``, 2 bytes per element written and read again).

Products of two fp16 operands with <= 6 significant bits each are exact in the fp32 accumulator, so the result
equals the twin ``(a.dequantize(float32) @ b.dequantize(float32).T)`` up to summation order; the epilogue
multiplies by ``gA * gB * 2**7``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from ..nvfp4 import NVFP4Tensor
from .nvfp4_gemm import (
    _decode_tile,
    _decode_tile_asm,
    _grouped_tile,
    _scale_x128,
    _words,
    check_operands,
    nvfp4_dequantize_triton,
)

GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3)  # untuned
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_N=2, num_warps=4, num_stages=1)


@triton.jit
def _weight_tile(w_w, wsc, K, k0, kw, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
                 DECODE_ASM: tl.constexpr):
    """The weights' K step at k0 decoded in natural K order: e2m1 * scale * 2^-7 in fp16 [BLOCK_N, BLOCK_K]."""
    if MASKED:  # K tail: missing words decode to 0
        ww = tl.load(w_w, mask=((k0 // 8 + kw) < K // 8)[None, :], other=0)
    else:
        ww = tl.load(w_w)
    if DECODE_ASM:
        w = _decode_tile_asm(ww, _scale_x128(wsc), BLOCK_N, BLOCK_K, NATURAL=True)
    else:
        w = _decode_tile(ww, _scale_x128(wsc), BLOCK_N, BLOCK_K, NATURAL=True)
    return w


@triton.jit
def _nvfp4_gemm_rs_kernel(
    x_ptr, w_ptr, ws_ptr, ga_ptr, gb_ptr, c_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_wsn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    DECODE_ASM: tl.constexpr,
):
    """x: fp16 [M, K] decoded activations; w: int32 words [N, K/8]; ws: uint8 E4M3 [N, K/16]; ga/gb: float32
    global scales; c [M, N]. One program: a BLOCK_N x BLOCK_M tile of C^T. Full K steps run unmasked, then one
    masked step for a K tail (masks in every step would cost the pipelining)."""
    # GROUP_N weight tiles share each activation tile while it is in L2
    pid_n, pid_m = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # rows wrap, so loads need no row mask
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    kw = tl.arange(0, BLOCK_K // 8)
    ks = tl.arange(0, BLOCK_K // 16)
    kk = tl.arange(0, BLOCK_K)
    w_w = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + kw[None, :]
    w_s = ws_ptr + rn.to(tl.int64)[:, None] * stride_wsn + ks[None, :]
    x_t = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    # Scales are prefetched one K step ahead into registers (as in nvfp4_gemm: too few bytes for async copies).
    nks = K // 16
    wsc = tl.load(w_s, mask=(ks < nks)[None, :], other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, full, BLOCK_K):
        w_s += BLOCK_K // 16
        wsc_next = tl.load(w_s, mask=(((k0 + BLOCK_K) // 16 + ks) < nks)[None, :], other=0)
        w = _weight_tile(w_w, wsc, K, k0, kw, BLOCK_N, BLOCK_K, False, DECODE_ASM)
        acc = tl.dot(w, tl.trans(tl.load(x_t)), acc)
        w_w += BLOCK_K // 8
        x_t += BLOCK_K
        wsc = wsc_next
    if full < K:  # missing scales (prefetched masked) and activations are 0
        w = _weight_tile(w_w, wsc, K, full, kw, BLOCK_N, BLOCK_K, True, DECODE_ASM)
        xt = tl.load(x_t, mask=((full + kk) < K)[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(xt), acc)

    out = (acc * (tl.load(ga_ptr) * tl.load(gb_ptr) * 128.0)).to(c_ptr.dtype.element_ty)  # undo B's 2^-7
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(c_ptr + cm.to(tl.int64)[None, :] * stride_cm + cn[:, None], out,
             mask=(cm < M)[None, :] & (cn < N)[:, None])


def nvfp4_matmul_rs(a: NVFP4Tensor, b: NVFP4Tensor, *, out_dtype: torch.dtype = torch.bfloat16,
                    config: Optional[dict] = None, decode_asm: Optional[bool] = None) -> torch.Tensor:
    """``a [..., M, K] @ b [N, K]^T`` -> ``[..., M, N]`` in ``out_dtype``: a decoded to fp16 first, b decoded in
    the GEMM. ``config``: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_N, num_warps, num_stages (default GPU_CONFIG, or
    INTERPRET_CONFIG in Triton's interpreter). ``decode_asm``: b's decode in inline PTX (default on GPU) or in
    plain Triton ops (the interpreter's only choice)."""
    k = check_operands(a, b)
    lead = a.shape[:-1]
    x = nvfp4_dequantize_triton(a, dtype=torch.float16).reshape(-1, k)  # e2m1 * scale, exact
    bw, bsc = _words(b)
    m, n = x.shape[0], bw.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return c.reshape(*lead, n)
    cfg = dict(config or (INTERPRET_CONFIG if interpreting() else GPU_CONFIG))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _nvfp4_gemm_rs_kernel[grid](
        x, bw, bsc, a.global_scale.reshape(1).to(torch.float32), b.global_scale.reshape(1).to(torch.float32), c,
        m, n, k, x.stride(0), bw.stride(0), bsc.stride(0), c.stride(0),
        DECODE_ASM=not interpreting() if decode_asm is None else decode_asm, **cfg)
    return c.reshape(*lead, n)
