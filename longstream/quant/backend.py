"""Dispatch of quantized compute: `reference` (plain PyTorch, any device), `triton` (Hopper/Ampere GPUs) and
`native` (Blackwell `torch._scaled_mm` with FP4 operands; written to the documented API, not run here: no
Blackwell GPU).

Every entry point computes the same function on every backend: NVFP4 products are emulated exactly (FP4 x E4M3
products are exact in bf16/fp16, accumulation in fp32), so backends differ only in summation order.
NVFP4 quantize is bit-exact on every backend.

| entry point          | reference                      | triton (CUDA)                          | native (sm_100)               |
| -------------------- | ------------------------------ | -------------------------------------- | ----------------------------- |
| `nvfp4_quantize`     | `nvfp4.quantize`               | fused Triton quantize (bit-exact)      | the Triton quantize           |
| `nvfp4_matmul`       | dequantize + fp32 matmul       | exact fp16 decode + Triton GEMM        | `torch._scaled_mm` FP4 x FP4  |
| `nvfp4_linear`       | quantize x, then the above     | quantize-and-decode x, the above       | quantize x, then the above    |
| `fp8_matmul_rowwise` | `fp8.fp8_matmul_reference`     | `torch._scaled_mm` rowwise             | `torch._scaled_mm` rowwise    |

Triton is imported lazily, so the reference backend works without it. Under ``TRITON_INTERPRET=1`` the triton
backend also accepts CPU tensors (that is how the CPU tests run the kernels).
"""

from __future__ import annotations

import torch

from . import fp8, nvfp4
from .nvfp4 import NVFP4Tensor

BACKENDS = ("reference", "triton", "native")
NVFP4_MATMUL_IMPLS = ("fused", "split", "decoded")


def default_backend(device: torch.device) -> str:
    """`native` on compute capability 10.x, `triton` on other CUDA GPUs, else `reference`."""
    if device.type != "cuda":
        return "reference"
    major, _ = torch.cuda.get_device_capability(device)
    return "native" if major == 10 else "triton"


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _check_impl(impl: str) -> None:
    if impl not in NVFP4_MATMUL_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(NVFP4_MATMUL_IMPLS)}")


def _check_triton_device(t: torch.Tensor, backend: str) -> None:
    from .kernels import interpreting, triton_available

    if not triton_available():
        raise RuntimeError(f"backend {backend!r} needs triton (pip install triton)")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"backend {backend!r} needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def nvfp4_quantize(
    x: torch.Tensor,
    *,
    global_scale: torch.Tensor | None = None,
    backend: str = "reference",
    check_finite: bool = True,
) -> NVFP4Tensor:
    """1x16-block NVFP4 quantization (round to nearest even) of x [..., K]; bit-exact on every backend.

    check_finite: on triton/native, read the device-side NaN/Inf flag (one host sync) and raise ``ValueError``
    as the reference does; ``False`` keeps the call asynchronous (NaN/Inf then give unspecified codes).
    """
    _check(backend)
    if backend == "reference":
        return nvfp4.quantize(x, global_scale=global_scale)
    _check_triton_device(x, backend)
    from .kernels.nvfp4_quant import nvfp4_quantize_triton

    return nvfp4_quantize_triton(x, global_scale=global_scale, check_finite=check_finite)


def fp8_quantize_rowwise(
    x: torch.Tensor, *, backend: str = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3 quantization of x [..., K] -> (q, float32 scale [..., 1]). The reference checks for NaN/Inf
    (a host sync); the Triton kernel is one asynchronous pass, bit-identical on finite input."""
    _check(backend)
    if backend == "reference":
        return fp8.quantize_rowwise(x)
    _check_triton_device(x, backend)
    from .kernels.fp8_quant import fp8_quantize_rowwise_triton

    return fp8_quantize_rowwise_triton(x)


def nvfp4_matmul(
    a: NVFP4Tensor,
    b: NVFP4Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "reference",
    impl: str = "decoded",
) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T with both operands NVFP4 (W4A4), fp32 accumulation, result in `out_dtype`.

    impl (triton only; bench/RESULTS.md, H200): "decoded" (default) decodes both exactly to fp16 in memory, then
    a Triton fp16 GEMM (persistent, TMA, on Hopper) applies the global scales in its epilogue: exact emulation,
    0.91-1.01x bf16 cuBLAS at the 5B model's shapes, 2*(M+N)*K bytes of scratch. "fused" decodes inside the
    Triton GEMM: exact, no scratch, ~0.5x bf16. "split" decodes both to bf16, then cuBLAS: ~0.9x bf16, but one
    extra bf16 rounding (global scales folded into A).
    """
    _check(backend)
    _check_impl(impl)
    if backend == "reference":
        return (a.dequantize(torch.float32) @ b.dequantize(torch.float32).T).to(out_dtype)
    if backend == "native":
        from .kernels.native import nvfp4_matmul_native

        return nvfp4_matmul_native(a, b, out_dtype=out_dtype)
    _check_triton_device(a.data, backend)
    from .kernels import nvfp4_gemm

    if impl == "split":
        return nvfp4_gemm.nvfp4_matmul_split(a, b, out_dtype=out_dtype)
    if impl == "decoded":
        from .kernels.nvfp4_gemm_decoded import nvfp4_matmul_decoded

        return nvfp4_matmul_decoded(a, b, out_dtype=out_dtype)
    return nvfp4_gemm.nvfp4_matmul_triton(a, b, out_dtype=out_dtype)


def nvfp4_linear(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None, *, out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "reference", impl: str = "decoded",
) -> torch.Tensor:
    """W4A4 linear: x [M, K] quantized to NVFP4 (1x16 blocks, RNE, its own global scale), times w [N, K]^T, plus
    bias [N]. The reference and triton's impl "decoded" add the bias in float32 before the one rounding to
    `out_dtype`; the other impls and native add it after, in `out_dtype`. On triton, "decoded" quantizes x
    straight to its fp16 decode in one pass (``nvfp4_linear_decoded``). GPU backends do not read back a NaN/Inf
    flag (that would sync the host)."""
    _check(backend)
    _check_impl(impl)
    if backend == "reference":
        out = nvfp4.quantize(x).dequantize(torch.float32) @ w.dequantize(torch.float32).T
        return (out if bias is None else out + bias.float()).to(out_dtype)
    if backend == "triton" and impl == "decoded":
        _check_triton_device(x, backend)
        from .kernels.nvfp4_gemm_decoded import nvfp4_linear_decoded

        return nvfp4_linear_decoded(x, w, bias, out_dtype=out_dtype)
    xq = nvfp4_quantize(x.contiguous(), backend=backend, check_finite=False)
    out = nvfp4_matmul(xq, w, out_dtype=out_dtype, backend=backend, impl=impl)
    return out if bias is None else out + bias.to(out_dtype)


def fp8_matmul_rowwise(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
    *, out_dtype: torch.dtype = torch.bfloat16, backend: str = "reference",
) -> torch.Tensor:
    """Rowwise-scaled FP8 W8A8 product x @ w^T (+ bias). triton/native: ``torch._scaled_mm`` rowwise."""
    _check(backend)
    if backend == "reference":
        return fp8.fp8_matmul_reference(xq, xs, wq, ws, bias, out_dtype=out_dtype)
    return fp8.scaled_mm_rowwise(xq, xs, wq, ws, bias, out_dtype=out_dtype)
