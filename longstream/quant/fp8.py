"""FP8 E4M3 helpers: rowwise and block (1x128, 128x128) quantization and the W8A8 reference.

Conventions (same as torchao's float8 rowwise and DeepSeek-style block scaling):

* scale = amax / 448 in float32, one per row (shape ``[..., 1]``), per 1x128 block
  (``[..., K/128]``) or per 128x128 tile of the last two dims (``[..., M/128, K/128]``);
* q = clamp(x / scale, -448, 448).to(float8_e4m3fn)  (float32 division, RNE cast);
* x ~= float(q) * scale.

An all-zero row/block would give scale 0; amax is clamped to ``AMAX_EPS`` first so scales are
always positive (the zeros still quantize to 0).

On Hopper the fast path is ``torch._scaled_mm`` with rowwise scales (``scaled_mm_rowwise``); it also
runs on CPU in torch 2.13 (not 2.11), which lets the CPU tests compare it with ``fp8_matmul_reference``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

E4M3_MAX = 448.0
AMAX_EPS = 1e-12


def _quantize_with_amax(x: torch.Tensor, amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # amax already broadcastable against x.
    # divide by a tensor, not a Python scalar: on CUDA ``t / 448.0`` becomes ``t * (1/448.0)``
    scale = amax.float().clamp(min=AMAX_EPS) / torch.tensor(E4M3_MAX, device=amax.device)
    q = torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("FP8 quantize: input contains NaN or Inf")


def quantize_rowwise(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) FP8 E4M3 quantization. Returns (q [..., K], scale float32 [..., 1])."""
    _check_finite(x)
    return _quantize_with_amax(x, x.float().abs().amax(dim=-1, keepdim=True))


def quantize_block(x: torch.Tensor, block: Tuple[int, int] = (1, 128)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 quantization with (1, 128) or (128, 128) blocks over the last two dims.

    Returns (q, scale) with scale float32 ``[..., M, K/128]`` for 1x128 and ``[..., M/128, K/128]``
    for 128x128 (the layouts torch's BlockWise1x128 / BlockWise128x128 scaled_mm expects).
    """
    bm, bk = tuple(block)
    if (bm, bk) not in ((1, 128), (128, 128)):
        raise ValueError(f"block must be (1, 128) or (128, 128), got {block!r}")
    if x.shape[-1] % bk or (bm > 1 and (x.ndim < 2 or x.shape[-2] % bm)):
        raise ValueError(f"shape {tuple(x.shape)} is not a multiple of block {block}")
    _check_finite(x)
    *lead, k = x.shape
    if bm == 1:
        xb = x.reshape(*lead, k // bk, bk)
        q, scale = _quantize_with_amax(xb, xb.float().abs().amax(dim=-1, keepdim=True))
        return q.reshape(x.shape), scale.squeeze(-1)
    m = lead[-1]
    xb = x.reshape(*lead[:-1], m // bm, bm, k // bk, bk)
    q, scale = _quantize_with_amax(xb, xb.float().abs().amax(dim=(-3, -1), keepdim=True))
    return q.reshape(x.shape), scale.squeeze(-1).squeeze(-2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``float(q) * scale`` with the scale expanded to q's shape.

    Works for rowwise ``[..., 1]``, 1x128 ``[..., K/128]`` and 128x128 ``[..., M/128, K/128]`` scales:
    each trailing dim of ``scale`` is repeated ``q.shape[d] // scale.shape[d]`` times.
    """
    s = scale.float()
    s = s.reshape((1,) * (q.ndim - s.ndim) + tuple(s.shape))
    for d in range(q.ndim):
        if s.shape[d] != q.shape[d]:
            if s.shape[d] == 0 or q.shape[d] % s.shape[d]:
                raise ValueError(f"scale shape {tuple(scale.shape)} does not tile q shape {tuple(q.shape)}")
            s = s.repeat_interleave(q.shape[d] // s.shape[d], dim=d)
    return (q.float() * s).to(dtype)


def fp8_matmul_reference(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """What rowwise ``torch._scaled_mm`` computes: ``(xq @ wq^T) * xs * ws^T + bias`` in float32.

    xq: e4m3 [..., K], xs: float32 [..., 1]; wq: e4m3 [N, K], ws: float32 [N, 1]. E4M3 x E4M3
    products are exact in float32, so this equals the tensor core up to summation order.
    """
    acc = xq.float() @ wq.float().t()
    out = acc * xs.float() * ws.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 rowwise linear ``x @ w^T + bias``: quantize x per token and w per output channel to
    E4M3, multiply with float32 accumulation (as ``fp8_matmul_reference``), return ``x.dtype``."""
    xq, xs = quantize_rowwise(x)
    wq, ws = quantize_rowwise(w)
    return fp8_matmul_reference(xq, xs, wq, ws, bias, out_dtype=x.dtype)


def scaled_mm_rowwise(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Rowwise W8A8 GEMM through ``torch._scaled_mm`` (CUDA sm89+; also CPU in torch 2.13).

    Same arguments as ``fp8_matmul_reference``; leading dims of xq are flattened for the GEMM.
    K and N must be multiples of 16. Notes: torch 2.11 on CPU supports only per-tensor scales (this
    raises there); CUDA rejects a bias with float32 output, so that bias is added here in float32;
    H100 FP8 tensor cores accumulate with fewer bits than fp32 (seen: error ~1e-3 of sum |x*w|).
    """
    *lead, k = xq.shape
    a = xq.reshape(-1, k)
    sa = xs.float().reshape(-1, 1)
    sb = ws.float().reshape(1, -1)
    late_bias = bias is not None and out_dtype == torch.float32
    try:
        out = torch._scaled_mm(a, wq.t(), scale_a=sa, scale_b=sb, bias=None if late_bias else bias,
                               out_dtype=out_dtype)
    except RuntimeError as e:  # e.g. CPU torch < 2.13, GPU older than sm89
        raise RuntimeError(f"rowwise FP8 torch._scaled_mm is not available here ({xq.device}, "
                           f"torch {torch.__version__}): {e}") from e
    if late_bias:
        out = out + bias.float()
    return out.reshape(*lead, wq.shape[0])
