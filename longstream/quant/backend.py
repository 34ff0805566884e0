"""Dispatch of quantized compute: `reference` (plain PyTorch, any device), `triton` (Hopper/Ampere GPUs) and
`native` (Blackwell `torch._scaled_mm` with FP4 operands; written to the documented API, not run here).

Every entry point computes the same function on every backend: NVFP4 products are emulated exactly (FP4 x E4M3
products are exact in bf16, accumulation in fp32), so backends differ only in summation order.
"""

from __future__ import annotations

import torch

from . import fp8, nvfp4
from .nvfp4 import NVFP4Tensor

BACKENDS = ("reference", "triton", "native")


def default_backend(device: torch.device) -> str:
    """`native` on compute capability 10.x, `triton` on other CUDA GPUs, else `reference`."""
    if device.type != "cuda":
        return "reference"
    major, _ = torch.cuda.get_device_capability(device)
    return "native" if major == 10 else "triton"


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def nvfp4_quantize(x: torch.Tensor, *, global_scale: torch.Tensor | None = None, backend: str = "reference") -> NVFP4Tensor:
    """1x16-block NVFP4 quantization (round to nearest even) of x [..., K]."""
    _check(backend)
    return nvfp4.quantize(x, global_scale=global_scale)


def nvfp4_matmul(
    a: NVFP4Tensor, b: NVFP4Tensor, *, out_dtype: torch.dtype = torch.bfloat16, backend: str = "reference"
) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T with both operands NVFP4 (W4A4), fp32 accumulation, result in `out_dtype`."""
    _check(backend)
    return (a.dequantize(torch.float32) @ b.dequantize(torch.float32).T).to(out_dtype)


def fp8_matmul_rowwise(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
    *, out_dtype: torch.dtype = torch.bfloat16, backend: str = "reference",
) -> torch.Tensor:
    """Rowwise-scaled FP8 W8A8 product x @ w^T (+ bias)."""
    _check(backend)
    if backend == "reference":
        return fp8.fp8_matmul_reference(xq, xs, wq, ws, bias, out_dtype=out_dtype)
    return fp8.scaled_mm_rowwise(xq, xs, wq, ws, bias, out_dtype=out_dtype)
