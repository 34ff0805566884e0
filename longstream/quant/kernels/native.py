"""Blackwell (compute capability 10.x) NVFP4 GEMM through ``torch._scaled_mm`` with FP4 operands.

NOT RUN HERE: no Blackwell GPU was available. This module is written to the documented API (PyTorch >= 2.8
``torch._scaled_mm`` with ``torch.float4_e2m1fn_x2`` operands and E4M3 block scales in cuBLAS's swizzled
"block scaling factors" layout, as torchao's NVFP4 path uses it); the CPU tests check the operand
construction (dtypes, shapes, strides, the scale swizzle) against an independent emulation of that contract.

Contract of ``torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, out_dtype=...)`` for NVFP4:

* ``mat_a``: ``float4_e2m1fn_x2`` ``[M, K/2]`` row-major (two codes per byte, low nibble first: our packing).
* ``mat_b``: ``float4_e2m1fn_x2`` ``[K/2, N]`` column-major, i.e. ``b.data.view(float4_e2m1fn_x2).t()``.
* ``scale_a`` / ``scale_b``: ``float8_e4m3fn``, the ``[rows, K/16]`` block scales padded to ``[128*ceil(rows/128),
  4*ceil(K/64)]`` with zeros and swizzled (``swizzle_scales``), flattened.
* Global scales are not taken; the result is multiplied by ``gA * gB`` afterwards (in float32 here).
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..nvfp4 import BLOCK, NVFP4Tensor

NOT_RUN_HERE = "not run here: no Blackwell GPU"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` block scales -> flat cuBLAS block-scaling layout (``128*ceil(R/128) * 4*ceil(C/4)`` elements).

    The matrix is padded with zeros to whole 128x4 tiles; tiles are stored row-tile-major (all column tiles of
    row tile 0 first). Inside a tile, the scale of (row r, column c) sits at offset
    ``(r % 32) * 16 + (r // 32) * 4 + c``: the 128 rows are 4 groups of 32, and each of the 32 lines holds
    4 groups x 4 columns.
    """
    if scale.dim() != 2:
        raise ValueError(f"swizzle_scales needs a 2D [rows, K/16] tensor, got {tuple(scale.shape)}")
    r, c = scale.shape
    rt, ct = _ceil(r, 128), _ceil(c, 4)
    raw = scale.view(torch.uint8) if scale.dtype == torch.float8_e4m3fn else scale
    padded = torch.zeros((rt * 128, ct * 4), dtype=raw.dtype, device=raw.device)
    padded[:r, :c] = raw
    # [rt, 4 (row group g), 32 (line l), ct, 4 (col)] -> [rt, ct, l, g, col]
    tiles = padded.reshape(rt, 4, 32, ct, 4).permute(0, 3, 2, 1, 4)
    out = tiles.contiguous().reshape(-1)
    return out.view(torch.float8_e4m3fn) if scale.dtype == torch.float8_e4m3fn else out


def unswizzle_scales(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``swizzle_scales``: flat swizzled scales -> ``[rows, cols]``."""
    rt, ct = _ceil(rows, 128), _ceil(cols, 4)
    raw = flat.view(torch.uint8) if flat.dtype == torch.float8_e4m3fn else flat
    tiles = raw.reshape(rt, ct, 32, 4, 4).permute(0, 3, 2, 1, 4)  # -> [rt, g, l, ct, col]
    out = tiles.reshape(rt * 128, ct * 4)[:rows, :cols].contiguous()
    return out.view(torch.float8_e4m3fn) if flat.dtype == torch.float8_e4m3fn else out


def native_operands(
    a: NVFP4Tensor, b: NVFP4Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mat_a, mat_b, scale_a, scale_b) for ``torch._scaled_mm``; a ``[..., M, K]`` is flattened to ``[M, K]``."""
    k = a.shape[-1]
    if b.data.dim() != 2 or b.shape[-1] != k:
        raise ValueError(f"nvfp4 matmul: b must be [N, K] with K={k}, got {tuple(b.shape)}")
    if k % 32:
        raise ValueError(f"native NVFP4 _scaled_mm needs K % 32 == 0 (16-byte rows), got K={k}")
    fp4 = torch.float4_e2m1fn_x2
    mat_a = a.data.reshape(-1, k // 2).contiguous().view(fp4)
    mat_b = b.data.contiguous().view(fp4).t()  # [K/2, N], column-major
    scale_a = swizzle_scales(a.scale.reshape(-1, k // BLOCK))
    scale_b = swizzle_scales(b.scale.reshape(-1, k // BLOCK))
    return mat_a, mat_b, scale_a, scale_b


def _require_blackwell(device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 10:
        raise RuntimeError(f"backend 'native' needs a Blackwell GPU (compute capability 10.x); got {device} "
                           f"({NOT_RUN_HERE})")


def nvfp4_matmul_native(a: NVFP4Tensor, b: NVFP4Tensor, *, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``a [..., M, K] @ b [N, K]^T`` on Blackwell tensor cores (NVFP4 x NVFP4, fp32 accumulation).

    The block-scaled product comes back in float32, is multiplied by ``gA * gB`` and cast to ``out_dtype``
    (one rounding, as in the emulated paths). Not run here: no Blackwell GPU.
    """
    _require_blackwell(a.device)
    mat_a, mat_b, scale_a, scale_b = native_operands(a, b)
    out = torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, out_dtype=torch.float32)
    g = a.global_scale.float() * b.global_scale.float()
    return (out * g).to(out_dtype).reshape(*a.shape[:-1], b.shape[0])
