"""Quantized KV-cache storage (FP8 E4M3 and NVFP4), plugged into `longstream.model.kv_cache` by name.

Both quantize on write, in place, and dequantize to the compute dtype on read. Scales follow the cache's unit,
the latent frame: every (batch, head, frame slot) has one float32 scale, computed from that frame's keys (or
values) of that head when the frame is written.
- `fp8`:   e4m3 elements, scale = amax / 448 per (batch, head, frame). 1 byte per element (+ scales). Keys are
  stored [B, H, S, D], values transposed, [B, H, D, S] (tokens last): FP8 tensor cores take the second attention
  matmul's operand only K-major, so the cache can be attended to directly, both matmuls in FP8, with every tile
  streamed in by asynchronous copies (`FP8KVStorage.attend`).
- `nvfp4`: the NVFP4 format of `longstream.quant.nvfp4` (1x16 blocks along head_dim, E4M3 block scales) with the
  per-(batch, head, frame) scale as its global scale amax / (6 * 448). 4.5 bits per element (+ scales): with
  head_dim 128 a token-head takes 72 bytes against 256 in bf16 (3.56x smaller).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

from . import nvfp4
from .fp8 import E4M3_MAX
from .fp8_attention import fp8_attention_reference, token_scales

_HAS_TRITON = importlib.util.find_spec("triton") is not None


class _FrameScaledStorage:
    """Shared bookkeeping: token positions -> frame slots, per-frame scales."""

    def __init__(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device,
                 tokens_per_frame: int) -> None:
        if tokens % tokens_per_frame:
            raise ValueError("cache tokens must be whole frames")
        self.dtype, self.tokens_per_frame = dtype, tokens_per_frame
        slots = tokens // tokens_per_frame
        self.k_scale = torch.zeros(batch, heads, slots, dtype=torch.float32, device=device)
        self.v_scale = torch.zeros_like(self.k_scale)

    def _frames(self, index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots written and x regrouped per frame: [B, H, n_frames, T, D]."""
        b, h, n, d = x.shape
        return self._slots(index), x.float().reshape(b, h, n // self.tokens_per_frame, self.tokens_per_frame, d)

    def _slots(self, index: torch.Tensor) -> torch.Tensor:
        t = self.tokens_per_frame
        if index.numel() % t:
            raise ValueError("quantized KV storage is written whole frames at a time")
        return index.reshape(-1, t)[:, 0] // t

    def _scale_per_token(self, scale: torch.Tensor, length: int) -> torch.Tensor:
        return token_scales(scale, length, self.tokens_per_frame)


class FP8KVStorage(_FrameScaledStorage):
    """`k` e4m3 [B, H, S, D]; `v` e4m3 [B, H, D, S] (tokens last); `k_scale`, `v_scale` float32 [B, H, S / T]."""

    def __init__(self, batch, heads, tokens, head_dim, dtype, device, tokens_per_frame: int = 1) -> None:
        super().__init__(batch, heads, tokens, head_dim, dtype, device, tokens_per_frame)
        self.k = torch.zeros(batch, heads, tokens, head_dim, dtype=torch.float8_e4m3fn, device=device)
        self.v = torch.zeros(batch, heads, head_dim, tokens, dtype=torch.float8_e4m3fn, device=device)

    @staticmethod
    def quantize(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, F, T, D] -> (e4m3 of the same shape, scale [B, H, F])."""
        amax = frames.abs().amax(dim=(-2, -1))
        scale = torch.where(amax > 0, amax / torch.tensor(E4M3_MAX, device=frames.device), torch.ones_like(amax))
        q = (frames / scale[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q, scale

    def _parts(self):
        """(codes, scales, tokens_last) of K and of V."""
        return (self.k, self.k_scale, False), (self.v, self.v_scale, True)

    @staticmethod
    def _store_codes(store: torch.Tensor, index: torch.Tensor, codes: torch.Tensor, tokens_last: bool) -> None:
        """codes uint8 [B, H, n, D] into the rows `index` of `store`."""
        if tokens_last:
            store.view(torch.uint8).index_copy_(3, index, codes.transpose(-1, -2))
        else:
            store.view(torch.uint8).index_copy_(2, index, codes)

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, n, D], whole frames, at the cache rows `index` [n]: each frame's rows consecutive from a
        multiple of T, as `KVCache` writes them (the Triton write reads a frame's first row only)."""
        if k.is_cuda and _HAS_TRITON:  # one pass per frame, the same bytes as the eager path below
            from .kernels.kv_quant import fp8_kv_write

            for x, (store, scales, tokens_last) in zip((k, v), self._parts()):
                fp8_kv_write(x, index, store, scales, self.tokens_per_frame, tokens_last=tokens_last)
            return
        self.write_reference(index, k, v)

    def write_reference(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` in eager PyTorch ops (the Triton kernel's twin, and the path off CUDA)."""
        for x, (store, scales, tokens_last) in zip((k, v), self._parts()):
            slots, frames = self._frames(index, x)
            q, scale = self.quantize(frames)
            self._store_codes(store, index, q.flatten(2, 3).view(torch.uint8), tokens_last)
            scales.index_copy_(2, slots, scale)

    def write_fields(self, index: torch.Tensor, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> None:
        """Store already-quantized K, V as `parallel.ulysses.quantize_kv` sends them (payload uint8 [B, H, n, D],
        scale [B, H, n_frames, 1]): the bytes a `write` of the original values would store, without a second
        quantization."""
        slots = self._slots(index)
        for (payload, scale), (store, scales, tokens_last) in zip((k, v), self._parts()):
            self._store_codes(store, index, payload, tokens_last)
            scales.index_copy_(2, slots, scale[..., 0])

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, H, length, D] in the compute dtype."""
        if self.k.is_cuda and _HAS_TRITON:  # one-pass Triton decode, bit-identical to the reference below
            from .kernels.kv_dequant import fp8_kv_dequantize

            k, v = (fp8_kv_dequantize(c, s, length, self.tokens_per_frame, self.dtype, tokens_last=last)
                    for c, s, last in self._parts())
            return k, v
        out = []
        for store, scales, tokens_last in self._parts():
            codes = store[..., :length].transpose(-1, -2) if tokens_last else store[:, :, :length]
            out.append((codes.float() * self._scale_per_token(scales, length)[..., None]).to(self.dtype))
        return out[0], out[1]

    def attend(self, q: torch.Tensor, length: int, visible: torch.Tensor | None = None) -> torch.Tensor:
        """FP8 attention of q [B, H, Sq, D] over the first `length` cached tokens, straight from the E4M3 codes
        (`quant.fp8_attention`; `visible`: bool per frame slot): the Triton kernel on CUDA, its reference twin
        elsewhere. Queries and probabilities are rounded to E4M3 too, unlike `read` + SDPA."""
        args = (q, self.k, self.k_scale, self.v, self.v_scale, length, self.tokens_per_frame, visible)
        if q.is_cuda and _HAS_TRITON:
            from .kernels.fp8_attention import fp8_attention

            return fp8_attention(*args)
        return fp8_attention_reference(*args)

    def nbytes(self) -> int:
        return 2 * (self.k.numel() + self.k_scale.numel() * 4)


class NVFP4KVStorage(_FrameScaledStorage):
    def __init__(self, batch, heads, tokens, head_dim, dtype, device, tokens_per_frame: int = 1) -> None:
        if head_dim % nvfp4.BLOCK:
            raise ValueError(f"NVFP4 KV storage needs head_dim divisible by {nvfp4.BLOCK}, got {head_dim}")
        super().__init__(batch, heads, tokens, head_dim, dtype, device, tokens_per_frame)
        shape = (batch, heads, tokens)
        self.k = torch.zeros(*shape, head_dim // 2, dtype=torch.uint8, device=device)
        self.v = torch.zeros_like(self.k)
        self.k_block = torch.zeros(*shape, head_dim // nvfp4.BLOCK, dtype=torch.float8_e4m3fn, device=device)
        self.v_block = torch.zeros_like(self.k_block)

    @staticmethod
    def quantize(frames: torch.Tensor) -> tuple[nvfp4.NVFP4Tensor, torch.Tensor]:
        """[B, H, F, T, D] -> (NVFP4 with one global scale per frame, that scale [B, H, F])."""
        g = nvfp4.global_scale_from_amax(frames.abs().amax(dim=(-2, -1)))
        if frames.is_cuda and _HAS_TRITON:  # fused Triton twin of the line below, bit-exact, no host sync
            from .kernels.nvfp4_quant import nvfp4_quantize_triton

            return nvfp4_quantize_triton(frames, global_scale=g[..., None, None], check_finite=False), g
        return nvfp4.quantize(frames, global_scale=g[..., None, None].expand(*frames.shape[:-1], 1)), g

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for x, store, blocks, scales in ((k, self.k, self.k_block, self.k_scale),
                                         (v, self.v, self.v_block, self.v_scale)):
            slots, frames = self._frames(index, x)
            q, g = self.quantize(frames)
            store.index_copy_(2, index, q.data.flatten(2, 3))
            blocks.view(torch.uint8).index_copy_(2, index, q.scale.flatten(2, 3).view(torch.uint8))
            scales.index_copy_(2, slots, g)

    def write_fields(self, index: torch.Tensor, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> None:
        """Store already-quantized K, V as `parallel.ulysses.quantize_kv` sends them (codes [B, H, n, D/2], block
        scales uint8 [B, H, n, D/16], frame scale [B, H, n_frames, 1]), without a second quantization (which
        would not reproduce the bytes: NVFP4 re-rounds block scales)."""
        slots = self._slots(index)
        for (codes, block, g), store, blocks, scales in ((k, self.k, self.k_block, self.k_scale),
                                                         (v, self.v, self.v_block, self.v_scale)):
            store.index_copy_(2, index, codes)
            blocks.view(torch.uint8).index_copy_(2, index, block)
            scales.index_copy_(2, slots, g[..., 0])

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = ((self.k, self.k_block, self.k_scale), (self.v, self.v_block, self.v_scale))
        if self.k.is_cuda and _HAS_TRITON:  # one-pass Triton decode, bit-identical to the reference below
            from .kernels.kv_dequant import nvfp4_kv_dequantize

            k, v = (nvfp4_kv_dequantize(c, b, g, length, self.tokens_per_frame, self.dtype) for c, b, g in parts)
            return k, v
        out = []
        for store, blocks, scales in parts:
            g = self._scale_per_token(scales, length)[..., None]
            out.append(nvfp4.dequantize(store[:, :, :length], blocks[:, :, :length], g, dtype=self.dtype))
        return out[0], out[1]

    def nbytes(self) -> int:
        return 2 * (self.k.numel() + self.k_block.numel() + self.k_scale.numel() * 4)
