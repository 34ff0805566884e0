"""Reference NVFP4 codec in plain PyTorch (CPU and GPU). This module defines the format.

Every NVFP4 path in longstream (Triton kernels, KV cache, Ulysses packing, training GEMMs)
must agree with this file bit for bit.

Format
------
A tensor ``x`` of shape ``[..., K]`` (``K % 16 == 0``) is stored as three parts:

* ``data``: uint8 ``[..., K/2]``. Each element is an FP4 E2M1 code (a nibble): bit 3 is the
  sign, bits 0-2 index the magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Two codes per byte, element
  ``2i`` in the LOW nibble and element ``2i+1`` in the HIGH nibble. ``-0`` (code 8) is kept.
* ``scale``: float8_e4m3fn ``[..., K/16]``, one block scale per 16 consecutive elements of the
  last dim. With 16x16 blocks (weights in training) the amax is taken over a 16x16 tile of the
  last two dims, and the tile's scale is repeated on each of its 16 rows, so the layout is the
  same as for 1x16 blocks and ``W`` and ``W^T`` share scales.
* ``global_scale``: float32 0-dim tensor, ``amax(|x|) / (6 * 448)``, so that block scales use
  the whole E4M3 range. A caller may instead give one global scale per row, shaped
  ``[..., 1]`` (the KV cache keeps one per frame and head); each row then encodes exactly as a
  tensor of its own with that global scale.

Decoding: ``x ~= e2m1(code) * (global_scale * float(scale))``.

Encoding (bit-exact with torchao 0.18 ``nvfp4_quantize(x, 16, per_tensor_amax_to_scale(amax))``),
all in float32::

    g   = amax / 2688                                  # global scale (6 * 448 = 2688)
    b   = amax_block / 6                               # block scale before E4M3
    s   = clamp(b / g, min=2**-6, max=448).to(e4m3)     # 2**-6 = finfo(e4m3).tiny: no subnormal scales
    v   = clamp(x * ((1 / g) / float(s)), -6, 6)        # reciprocal multiply, not division
    code = round_e2m1(v)                               # RNE (ties to even code) or stochastic

Round-to-nearest-even on the E2M1 grid sends ties to the even code: 0.25->0, 0.75->1, 1.25->1,
1.75->2, 2.5->2, 3.5->4, 5->4. Stochastic rounding picks one of the two neighbouring grid values
with probability proportional to the distance to the other (unbiased in the scaled domain).

All divisions are IEEE float32 divisions on every device. (torchao on CUDA divides by Python
scalars, which PyTorch's CUDA kernels compute as a multiply by the reciprocal, so torchao on a GPU can
differ from this definition, and from itself on CPU, in the last bit of rare scales.)

Special cases (our definition; torchao gives NaN scales here): an all-zero tensor has
``global_scale == 0``, all codes 0 and all scales 0, and decodes to exact zeros. An all-zero block
inside a nonzero tensor gets scale 2**-6 and codes 0, so it decodes to zeros. NaN/Inf inputs
raise ``ValueError``. A caller-supplied ``global_scale`` must be finite and >= 0; 0 encodes zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny
BLOCK = 16

# Magnitudes of codes 0..7; codes 8..15 are the negatives.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# RNE decision thresholds on |v|: "> t" for ties that go down (to the even code below),
# ">= t" for ties that go up (the code above is even).
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)

BlockSpec = Union[str, Tuple[int, int]]


def e2m1_values(device: Optional[torch.device] = None) -> torch.Tensor:
    """float32 LUT of the 16 E2M1 codes (index = code)."""
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """Round float values to E2M1 codes (uint8 0..15) with round-to-nearest-even.

    Values beyond +-6 saturate to +-6. The sign of zero is kept (-0.1 -> code 8).
    NaN is not representable and is not checked here (``quantize`` checks its input).
    """
    v = values.float()
    a = v.abs()
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for t in _TIE_DOWN:
        mag += (a > t).to(torch.uint8)
    for t in _TIE_UP:
        mag += (a >= t).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def _e2m1_encode_stochastic(v: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Stochastic rounding of float32 ``v`` (|v| <= 6) to E2M1 codes."""
    a = v.abs()
    lo = torch.zeros_like(a, dtype=torch.long)  # index of the largest grid value <= a
    for g in _E2M1_MAGNITUDES[1:]:
        lo += (a >= g).long()
    hi = (lo + 1).clamp(max=7)
    lut = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=v.device)
    lo_v, hi_v = lut[lo], lut[hi]
    gap = hi_v - lo_v
    # P(round up) = (a - lo) / (hi - lo); at the top of the grid (lo == hi == 6) never round up.
    p_up = torch.where(gap > 0, (a - lo_v) / torch.where(gap > 0, gap, 1.0), 0.0)
    u = torch.rand(a.shape, generator=generator, device=v.device, dtype=torch.float32)
    mag = torch.where(u < p_up, hi, lo).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, values 0..15) -> float32 values."""
    return e2m1_values(codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes ``[..., 2N]`` into bytes ``[..., N]``; element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes ``[..., N]`` into uint8 codes ``[..., 2N]`` (inverse of ``pack_fp4``)."""
    p = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


def _parse_block(block: BlockSpec) -> Tuple[int, int]:
    if isinstance(block, str):
        block = {"1x16": (1, 16), "16x16": (16, 16)}.get(block.lower(), None)  # type: ignore[assignment]
    else:
        block = tuple(block)  # type: ignore[assignment]
    if block not in ((1, 16), (16, 16)):
        raise ValueError(f"block must be (1, 16) / '1x16' or (16, 16) / '16x16', got {block!r}")
    return block  # type: ignore[return-value]


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    # IEEE float32 division by a constant. Dividing by a Python scalar is NOT used on purpose:
    # on CUDA PyTorch turns ``t / 6.0`` into ``t * (1/6.0)``, which differs in the last bit.
    return a / torch.tensor(b, dtype=torch.float32, device=a.device)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Global (per-tensor) scale ``amax / (6 * 448)`` in float32 (torchao's per_tensor_amax_to_scale)."""
    return _div(amax.float(), E4M3_MAX * E2M1_MAX)


@dataclass
class NVFP4Tensor:
    """An NVFP4-quantized tensor. See the module docstring for the format."""

    data: torch.Tensor  # uint8 [..., K/2], two E2M1 codes per byte, low nibble first
    scale: torch.Tensor  # float8_e4m3fn [..., K/16]
    global_scale: torch.Tensor  # float32, 0-dim (or per row, [..., 1])
    block: Tuple[int, int] = (1, BLOCK)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype=dtype)

    def transpose(self) -> "NVFP4Tensor":
        """Exact NVFP4 quantization of ``W^T`` (last two dims swapped); 16x16 blocks only.

        With 16x16 tiles every element keeps its code and every tile keeps its scale, so this only
        re-packs the codes and transposes the tile-scale grid (no re-rounding).
        """
        if self.block != (16, 16):
            raise ValueError("transpose() needs 16x16 blocks (1x16 scales are not shared by W^T)")
        codes = unpack_fp4(self.data).transpose(-1, -2).contiguous()
        tiles = self.scale[..., ::BLOCK, :]  # [..., M/16, K/16]: one row per 16-row group
        scale_t = tiles.transpose(-1, -2).repeat_interleave(BLOCK, dim=-2).contiguous()
        return NVFP4Tensor(pack_fp4(codes), scale_t, self.global_scale, self.block)


def quantize(
    x: torch.Tensor,
    *,
    block: BlockSpec = (1, BLOCK),
    rounding: str = "rne",
    generator: Optional[torch.Generator] = None,
    global_scale: Optional[Union[torch.Tensor, float]] = None,
) -> NVFP4Tensor:
    """Quantize ``x`` ``[..., K]`` to NVFP4.

    Args:
        block: (1, 16) for per-row 16-element blocks, (16, 16) for 2D tiles of the last two dims.
        rounding: "rne" (round to nearest, ties to even) or "stochastic".
        generator: torch.Generator for stochastic rounding (on x's device).
        global_scale: precomputed per-tensor scale (already ``amax / 2688``, not an amax); default
            computes it from ``x``.
    """
    bm, bk = _parse_block(block)
    if rounding not in ("rne", "stochastic"):
        raise ValueError(f"rounding must be 'rne' or 'stochastic', got {rounding!r}")
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % bk:
        raise ValueError(f"last dim must be a multiple of {bk}, got shape {tuple(x.shape)}")
    if bm > 1 and (x.ndim < 2 or x.shape[-2] % bm):
        raise ValueError(f"16x16 blocks need the last two dims multiples of 16, got {tuple(x.shape)}")
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("NVFP4 quantize: input contains NaN or Inf")

    if global_scale is None:
        g = global_scale_from_amax(xf.abs().amax() if xf.numel() else xf.new_zeros(()))
    else:
        g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        if g.numel() == 1:
            g = g.reshape(())
        elif g.ndim != x.ndim or g.shape[-1] != 1 or any(a not in (1, b) for a, b in zip(g.shape, x.shape)):
            raise ValueError(f"global_scale must be a scalar or broadcast to {tuple(x.shape[:-1])} + (1,), "
                             f"got {tuple(g.shape)}")
        if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
            raise ValueError("global_scale must be finite and >= 0")
    nonzero = g > 0
    g_safe = torch.where(nonzero, g, torch.ones_like(g))  # keeps the math NaN-free when g == 0

    # Blocks: [..., M/bm, bm, K/16, 16] -> amax over (bm, 16).
    *lead, k = xf.shape
    if bm == 1:
        xb = xf.reshape(*lead, k // bk, bk)
        block_amax = xb.abs().amax(dim=-1)  # [..., K/16]
    else:
        m = lead[-1]
        xb = xf.reshape(*lead[:-1], m // bm, bm, k // bk, bk)
        tile_amax = xb.abs().amax(dim=(-3, -1))  # [..., M/16, K/16]
        block_amax = tile_amax.repeat_interleave(bm, dim=-2)  # [..., M, K/16]
        xb = xf.reshape(*lead, k // bk, bk)

    block_scale = _div(block_amax, E2M1_MAX)
    scale = torch.clamp(block_scale / g_safe, min=E4M3_TINY, max=E4M3_MAX).to(torch.float8_e4m3fn)
    recip = (1.0 / g_safe) / scale.float()
    v = torch.clamp(xb * recip.unsqueeze(-1), -E2M1_MAX, E2M1_MAX).reshape(xf.shape)

    codes = e2m1_encode(v) if rounding == "rne" else _e2m1_encode_stochastic(v, generator)
    codes = torch.where(nonzero, codes, torch.zeros_like(codes))
    scale = torch.where(nonzero, scale.view(torch.uint8), torch.zeros_like(scale.view(torch.uint8)))
    return NVFP4Tensor(pack_fp4(codes), scale.view(torch.float8_e4m3fn), g, (bm, bk))


def dequantize(
    q: Union[NVFP4Tensor, torch.Tensor],
    scale: Optional[torch.Tensor] = None,
    global_scale: Optional[Union[torch.Tensor, float]] = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode an ``NVFP4Tensor`` (or raw ``data, scale, global_scale``) to ``dtype``.

    Computed in float32 as ``e2m1(code) * (global_scale * float(scale))`` (torchao's order).
    """
    if isinstance(q, NVFP4Tensor):
        data, scale, global_scale = q.data, q.scale, q.global_scale
    else:
        if scale is None or global_scale is None:
            raise ValueError("dequantize(data, scale, global_scale) needs all three parts")
        data = q
    vals = e2m1_decode(unpack_fp4(data))
    *lead, k = vals.shape
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=vals.device)
    s = g * scale.float()  # [..., K/16]
    out = vals.reshape(*lead, k // BLOCK, BLOCK) * s.unsqueeze(-1)
    return out.reshape(*lead, k).to(dtype)


def fake_quantize(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``dequantize(quantize(x, **kwargs))`` in ``x.dtype``."""
    return quantize(x, **kwargs).dequantize(x.dtype)
