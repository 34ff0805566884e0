"""NVFP4 W4A4 GEMM as "decode, then an fp16 GEMM with the global scales in its epilogue" (``impl="decoded"``).

``C[M, N] = A[M, K] @ B[N, K]^T``: both operands are decoded to fp16 in memory without their global scale
(``nvfp4_dequantize_triton``: ``e2m1 * scale`` has at most 6 significant bits in ``[2**-10, 2688]``, so it is
exact in fp16, and fp16 tensor cores run at the bf16 rate; Triton 3.6's interpreter computes bf16 dots wrongly,
fp16 ones right), then ``_scaled_gemm_kernel`` multiplies them with fp32 accumulation and
applies ``gA * gB`` to the accumulator once, before the single rounding to the output dtype. The result equals
the twin ``(a.dequantize(float32) @ b.dequantize(float32).T)`` up to fp32 summation order, like the fused
kernel's (``nvfp4_gemm``), and unlike ``nvfp4_matmul_split``, which folds ``gA * gB`` into A and so rounds A's
values to bf16 (cuBLAS takes no device-side scale for a 16-bit GEMM, and a pass over an fp32 output would add
~20%, estimated).

Why it is faster than the fused kernel (1.8-2.1x on an H200, bench/RESULTS.md): the main loop is a plain pipelined
GEMM (both tiles stream into shared memory while earlier wgmmas run); the fused kernel decodes in the loop, waits
for every wgmma, and stops at ~0.5x bf16 cuBLAS. On sm_90 and sm_100 it is a persistent kernel fed by TMA
(``_scaled_gemm_tma_kernel``, 1.05-1.13x bf16 cuBLAS as a plain fp16 GEMM on an H200); elsewhere
``_scaled_gemm_kernel`` with pointer loads (0.81-0.93x on the same H200). Cost: the two decode passes,
``2.5 * (M + N) * K`` bytes of traffic and ``2 * (M + N) * K`` bytes of scratch. ``nvfp4_linear_decoded`` (what
``QuantLinear`` runs) writes the activation's fp16 decode from the quantize pass itself, so its packed codes are
never written or read.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from ...devices import has_tma
from ..nvfp4 import NVFP4Tensor
from .nvfp4_gemm import _grouped_tile, check_operands, nvfp4_dequantize_triton
from .nvfp4_quant import nvfp4_quantize_decoded_triton

# Autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): large tiles with deep pipelines, the
# shapes Triton's Hopper GEMMs favour (bench/gemm.py, column "dec ptr", records the one autotuning picks).
_CONFIGS = [
    (128, 256, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, ga_ptr, gb_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr = False,
):
    """a: fp16 [M, K]; b: fp16 [N, K]; ga/gb: float32 scalars; bias [N];
    c [M, N] = (a @ b^T) * ga * gb (+ bias, in float32 before the one rounding)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # rows wrap, so loads need no row mask
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_p = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_p = b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_p)
            b = tl.load(b_p)
        else:  # K tail: missing elements are 0
            km = (k0 + rk < K)[None, :]
            a = tl.load(a_p, mask=km, other=0.0)
            b = tl.load(b_p, mask=km, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_p += BLOCK_K
        b_p += BLOCK_K
    _epilogue(acc, tl.load(ga_ptr) * tl.load(gb_ptr), bias_ptr, c_ptr, pid_m, pid_n, M, N, stride_cm,
              BLOCK_M, BLOCK_N, HAS_BIAS)


@triton.jit
def _epilogue(acc, g, bias_ptr, c_ptr, pid_m, pid_n, M, N, stride_cm,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """c[tile] = acc * g (+ bias) in float32, then one rounding to c's dtype; rows and columns past M, N skipped."""
    out = acc * g
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + cm.to(tl.int64)[:, None] * stride_cm + cn[None, :], out.to(c_ptr.dtype.element_ty),
             mask=(cm < M)[:, None] & (cn < N)[None, :])


@triton.jit
def _scaled_gemm_tma_kernel(
    a_desc, b_desc, ga_ptr, gb_ptr, bias_ptr, c_ptr,
    M, N, K, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, HAS_BIAS: tl.constexpr = False,
):
    """``_scaled_gemm_kernel`` as a persistent kernel: NUM_SMS programs walk the output tiles in grouped order,
    and the fp16 tiles arrive by TMA through host-made tensor descriptors (a [M, K], b [N, K]; reads past the
    tensor's rows or K come back as zeros). The loop over tiles is flattened into the K loop, so the next tile's
    loads are issued while this one's epilogue runs."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    g = tl.load(ga_ptr) * tl.load(gb_ptr)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(k_steps):
            a = a_desc.load([pid_m * BLOCK_M, step * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, step * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        _epilogue(acc, g, bias_ptr, c_ptr, pid_m, pid_n, M, N, stride_cm, BLOCK_M, BLOCK_N, HAS_BIAS)


def _autotuned(kernel, configs: list[tuple], pre_hook=None, key: tuple[str, ...] = ("M", "N", "K")):
    """`kernel` autotuned over (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) candidates, per value of the
    arguments named in `key`."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st,
                               num_warps=nw, pre_hook=pre_hook) for bm, bn, bk, st, nw in configs],
        key=list(key),
    )(kernel)


_scaled_gemm_autotuned = _autotuned(_scaled_gemm_kernel, _CONFIGS)


def tma_block_shapes(a_desc: str, b_desc: str) -> Callable[[dict], None]:
    """Autotune pre-hook for a TMA GEMM whose descriptor arguments are named `a_desc` ([M, K] tiles) and `b_desc`
    ([N, K] tiles): their tile shapes follow the config being launched. The descriptors are made per call, so only
    Triton's autotuner state is shared between threads (a race would mismatch a tile shape and fail the launch, not
    compute a wrong product)."""
    def hook(nargs: dict) -> None:
        nargs[a_desc].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs[b_desc].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    return hook


# Persistent TMA candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); bench/gemm.py records the one
# autotuning picks.
_TMA_CONFIGS = [
    (128, 256, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 5, 8),
    (128, 128, 128, 3, 8),
]
_scaled_gemm_tma_autotuned = _autotuned(_scaled_gemm_tma_kernel, _TMA_CONFIGS, tma_block_shapes("a_desc", "b_desc"))
SCALED_GEMM_KERNELS = ("pointer", "tma")


def default_kernel(device: torch.device) -> str:
    """"tma" where `devices.has_tma` (Hopper, datacenter Blackwell), else "pointer"."""
    return "tma" if has_tma(device) and not interpreting() else "pointer"


def _tma_ready(a: torch.Tensor, b: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides."""
    return not any(t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 for t in (a, b))


def choose_kernel(kernel: Optional[str], a: torch.Tensor, b: torch.Tensor) -> str:
    """`kernel` checked, or the default for these operands: `default_kernel`, with pointer loads where TMA cannot
    address them."""
    if kernel is None:
        return "tma" if default_kernel(a.device) == "tma" and _tma_ready(a, b) else "pointer"
    if kernel not in SCALED_GEMM_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(SCALED_GEMM_KERNELS)}")
    return kernel


def _program_slots(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (4 in the interpreter)."""
    return 4 if interpreting() else torch.cuda.get_device_properties(device).multi_processor_count


def _launch_tma(a: torch.Tensor, b: torch.Tensor, scalars: tuple, c: torch.Tensor, config: Optional[dict],
                has_bias: bool) -> None:
    """``_scaled_gemm_tma_kernel`` on a [M, K], b [N, K] into c; scalars: (ga, gb, bias or a placeholder)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not _tma_ready(a, b):
        raise ValueError("the TMA kernel needs 16-byte aligned operands with row strides of a multiple of 16 bytes")
    m, n = a.shape[0], b.shape[0]
    slots = _program_slots(a.device)
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    bm, bn, bk = (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) if config else (128, 128, 64)
    descs = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]))
    rest = (*scalars, c, m, n, a.shape[1], c.stride(0))
    if config is None:
        def grid(meta):
            return (min(slots, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)
        _scaled_gemm_tma_autotuned[grid](*descs, *rest, NUM_SMS=slots, HAS_BIAS=has_bias)
    else:
        grid = (min(slots, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
        _scaled_gemm_tma_kernel[grid](*descs, *rest, NUM_SMS=slots, HAS_BIAS=has_bias, **config)


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                  config: Optional[dict] = None, kernel: Optional[str] = None) -> torch.Tensor:
    """``(a [M, K] @ b [N, K]^T) * ga * gb (+ bias [N])`` -> [M, N] in ``out_dtype``: fp16 operands (unit stride
    along K), fp32 accumulation, float32 scalar tensors ``ga``, ``gb``, the bias added in float32 before the one
    rounding. ``config``: fixed kernel parameters (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
    instead of autotuning; the interpreter's default is small. ``kernel``: "tma" (persistent, operands by TMA;
    the default on sm_90 and sm_100 for aligned operands; 1.05-1.13x bf16 cuBLAS on an H200) or "pointer" (the
    default elsewhere and in the interpreter; 0.81-0.93x bf16 on the same H200)."""
    kernel = choose_kernel(kernel, a, b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_matmul needs a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != torch.float16 or b.dtype != torch.float16:
        raise ValueError(f"scaled_matmul takes fp16 operands, got {a.dtype} and {b.dtype}")
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("scaled_matmul needs unit stride along K")
    (m, k), n = a.shape, b.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    bias_arg = c if bias is None else bias.contiguous()
    args = (a, b, ga.reshape(1).to(torch.float32), gb.reshape(1).to(torch.float32), bias_arg, c, m, n, k,
            a.stride(0), b.stride(0), c.stride(0))
    if kernel == "tma":
        _launch_tma(a, b, args[2:5], c, config, bias is not None)
        return c
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _scaled_gemm_autotuned[grid](*args, EVEN_K=(k % 64 == 0),  # every candidate's BLOCK_K is 64
                                     HAS_BIAS=bias is not None)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _scaled_gemm_kernel[grid](*args, EVEN_K=(k % config["BLOCK_K"] == 0), HAS_BIAS=bias is not None,
                                  **config)
    return c


def nvfp4_matmul_decoded(a: NVFP4Tensor, b: NVFP4Tensor, *, out_dtype: torch.dtype = torch.bfloat16,
                         config: Optional[dict] = None, kernel: Optional[str] = None) -> torch.Tensor:
    """W4A4 ``a [..., M, K] @ b [N, K]^T`` -> ``[..., M, N]`` in ``out_dtype``: both operands decoded exactly to
    fp16, then ``scaled_matmul`` with their global scales (module docstring)."""
    k = check_operands(a, b)
    ad = nvfp4_dequantize_triton(a, dtype=torch.float16).reshape(-1, k)
    bd = nvfp4_dequantize_triton(b, dtype=torch.float16)
    out = scaled_matmul(ad, bd, a.global_scale, b.global_scale, out_dtype=out_dtype, config=config, kernel=kernel)
    return out.reshape(*a.shape[:-1], b.shape[0])


def nvfp4_linear_decoded(x: torch.Tensor, w: NVFP4Tensor, bias: Optional[torch.Tensor] = None, *,
                         out_dtype: torch.dtype = torch.bfloat16, config: Optional[dict] = None,
                         kernel: Optional[str] = None) -> torch.Tensor:
    """W4A4 linear ``quantize(x) [..., K] @ w [N, K]^T (+ bias)`` -> ``[..., N]``: the activation quantized and
    decoded to fp16 in one pass (``nvfp4_quantize_decoded_triton``, its packed codes never written), the weight
    decoded, then ``scaled_matmul`` with both global scales and the bias in its epilogue. Equals
    ``nvfp4_matmul_decoded(nvfp4_quantize(x), w) + bias`` up to that sum's rounding."""
    k = w.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"x has last dim {x.shape[-1]}, the weight {k}")
    xd, gx = nvfp4_quantize_decoded_triton(x)
    wd = nvfp4_dequantize_triton(w, dtype=torch.float16)
    out = scaled_matmul(xd.reshape(-1, k), wd, gx, w.global_scale, bias=bias, out_dtype=out_dtype, config=config,
                        kernel=kernel)
    return out.reshape(*x.shape[:-1], w.shape[0])
