"""CausalWanTransformer: the Wan2.1/2.2 DiT with one set of weights and three ways to run it.

- `forward(x, t, text_emb, causal=False)`: bidirectional, what diffusers' `WanTransformer3DModel` computes.
- `forward(..., causal=True)`: the whole sequence under a frame-level mask (block-causal by default, or any
  `frame_mask`, e.g. teacher forcing's clean/noisy mask), with per-frame timesteps and RoPE positions.
- `forward_stream(...)`: one chunk against a `KVCache`.

Parameter names equal diffusers' (`blocks.N.attn1.to_q`, `condition_embedder.time_embedder.linear_1`, ...), so
a diffusers state dict loads with `load_state_dict(strict=True)`. Tensor layouts follow diffusers: x [B, C, F, H, W],
t [B] (or per frame [B, F]) on the 0..1000 scale, text_emb [B, L, text_dim]. Inside, hidden states are kept as
[B, F, T, D] (T tokens per latent frame) so that adaLN modulation is per frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import fused
from ..config import TransformerConfig
from . import elementwise as ew
from .attention import FrameMaskAttention, attention, block_causal_mask, chunk_ids, expand_frame_mask
from .kv_cache import KVCache
from .rope import rope_cos_sin

SelfAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (layer, q, k, v, token mask or None) -> output; q, k, v and output are [B, H, S, Dh]
MaskedAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.run(ew.layer_norm, x, self.weight, self.bias, self.eps)


class _Linear2(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection names)."""

    def __init__(self, d_in: int, d_hidden: int, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.linear_2 = nn.Linear(d_hidden, d_hidden)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [N, dim] of timesteps [N] ordered (cos, sin), max period 10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ConditionEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int, text_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = _Linear2(freq_dim, dim, F.silu)
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = _Linear2(text_dim, dim, _gelu_tanh)

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N] -> (temb [N, D], 6 modulation vectors [N, 6, D])."""
        feats = timestep_features(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(feats).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class WanAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_qkv: nn.Module | None = None  # fuse_qkv sets it on attn1 (inference) in place of the three
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values [B, H, L, Dh] of a text context [B, L, D]."""
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return k, v


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, inner)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](_gelu_tanh(self.net[0].proj(x)))


class WanBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text_kv: tuple[torch.Tensor, torch.Tensor],
        self_attn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """x [B, F, T, D]; mod [B, F, 6, D] per-frame modulation; returns x updated."""
        b, f, t, d = x.shape
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + mod.float()).unsqueeze(3).unbind(2)

        h = fused.run(ew.modulated_norm, x, scale, shift, self.norm1.eps).reshape(b, f * t, d)
        a = self.attn1
        q, k, v = a.to_qkv(h).chunk(3, dim=-1) if a.to_qkv is not None else (a.to_q(h), a.to_k(h), a.to_v(h))
        v = v.unflatten(-1, (a.heads, -1))
        # q, k in v's dtype: under autocast the RMS norm and RoPE run in float32
        q = fused.run(ew.rms_norm_rope, q, a.norm_q.weight, a.norm_q.eps, a.heads, *rope).to(v.dtype)
        k = fused.run(ew.rms_norm_rope, k, a.norm_k.weight, a.norm_k.eps, a.heads, *rope).to(v.dtype)
        o = self_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        o = a.to_out[0](o.transpose(1, 2).flatten(2).to(q.dtype)).reshape(b, f, t, d)
        x = fused.run(ew.gated_residual, x, o, gate)

        h = self.norm2(x).reshape(b, f * t, d)
        c = self.attn2
        q = c.norm_q(c.to_q(h)).unflatten(-1, (c.heads, -1)).transpose(1, 2)
        o = attention(q, *text_kv).transpose(1, 2).flatten(2).to(q.dtype)
        x = x + c.to_out[0](o).reshape(b, f, t, d)

        h = fused.run(ew.modulated_norm, x, c_scale, c_shift, self.norm3.eps)
        return fused.run(ew.gated_residual, x, self.ffn(h), c_gate)


class FrameShard(Protocol):
    """How sequence-parallel ranks share a run of latent frames (see `longstream.parallel.stream_sp`)."""

    def frame_range(self, frames: int) -> tuple[int, int]: ...

    def attention(self, inner: MaskedAttention, frames: int, tokens_per_frame: int,
                  mask: torch.Tensor | None = None) -> Callable: ...


class Attends(Protocol):
    """What `forward_stream` needs of its cache: `KVCache`, or a sequence-parallel exchange around one."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class TextContext:
    """A prompt's text embedding projected once: per-layer cross-attention K/V, reused by every pass."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers


class CausalWanTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        # training: recompute each block's activations in the backward pass instead of keeping them
        self.checkpoint_blocks = False
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = ConditionEmbedder(dim, config.freq_dim, config.text_dim)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, model: nn.Module) -> "CausalWanTransformer":
        """Same config and weights as a diffusers `WanTransformer3DModel`."""
        cfg = model.config
        unsupported = {k: cfg.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if cfg.get(k)}
        if unsupported or cfg.get("qk_norm") != "rms_norm_across_heads":
            raise ValueError(f"unsupported WanTransformer3DModel options: {unsupported or cfg.get('qk_norm')}")
        ours = cls(config_from_diffusers(cfg))
        param = next(model.parameters())
        ours.to(device=param.device, dtype=param.dtype)
        ours.load_state_dict(model.state_dict(), strict=True)
        return ours

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "CausalWanTransformer":
        """Load a longstream safetensors checkpoint (see `longstream.model.checkpoints`)."""
        from .checkpoints import load_transformer

        return load_transformer(path, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    # -- pieces ---------------------------------------------------------------------------------------------------
    def prepare_text(self, text_emb: torch.Tensor) -> TextContext:
        """Project a text embedding [B, L, text_dim] into per-layer cross-attention K/V."""
        context = self.condition_embedder.text_embedder(text_emb.to(self.dtype))
        return TextContext([block.attn2.kv(context) for block in self.blocks])

    def _frame_timesteps(self, t: torch.Tensor, batch: int, frames: int, tokens: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.proj_out.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            return t[:, None].expand(batch, frames)
        if t.shape[1] == frames:
            return t
        if t.shape[1] == frames * tokens:
            per_frame = t.reshape(batch, frames, tokens)
            if not torch.equal(per_frame, per_frame[:, :, :1].expand_as(per_frame)):
                raise ValueError("per-token timesteps must be constant within each latent frame")
            return per_frame[:, :, 0]
        raise ValueError(f"timestep shape {tuple(t.shape)} fits neither [B], [B, F] nor [B, F*tokens]")

    def _embed(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Patchify x and embed per-frame timesteps: (tokens [B,F,T,D], temb [B,F,D], mod [B,F,6,D], grid)."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected latents [B, {self.config.in_channels}, F, H, W], got {tuple(x.shape)}"
            )
        pt, ph, pw = self.config.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch {self.config.patch_size}")
        h = self.patch_embedding(x.to(self.dtype))
        b, d, f, gh, gw = h.shape
        tokens = h.flatten(3).permute(0, 2, 3, 1)
        tf = self._frame_timesteps(t, b, f, gh * gw)
        temb, mod = self.condition_embedder.embed_time(tf.reshape(-1), tokens.dtype)
        return tokens, temb.unflatten(0, (b, f)), mod.unflatten(0, (b, f)), (f, gh, gw)

    def _rope(self, positions: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, grid[1], grid[2], self.config.attention_head_dim, self.config.rope_theta)

    def _blocks(
        self,
        tokens: torch.Tensor,
        mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text: TextContext,
        self_attn: SelfAttention,
    ) -> torch.Tensor:
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            attend = lambda q, k, v, i=i: self_attn(i, q, k, v)  # noqa: E731
            if recompute:  # collectives inside (Ulysses) run again in the same order on every rank
                tokens = checkpoint(block, tokens, mod, rope, text.layers[i], attend, use_reentrant=False)
            else:
                tokens = block(tokens, mod, rope, text.layers[i], attend)
        return tokens

    def _head(self, tokens: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        h = (self.norm_out(tokens.float()) * (1 + scale) + shift).to(tokens.dtype)
        h = self.proj_out(h)
        b = h.shape[0]
        f, gh, gw = grid
        pt, ph, pw = self.config.patch_size
        h = h.reshape(b, f, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.reshape(b, -1, f * pt, gh * ph, gw * pw)

    # -- the three ways to run -------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor | TextContext,
        causal: bool = False,
        *,
        frame_positions: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        chunk_frames: int | None = None,
        self_attention: MaskedAttention | None = None,
    ) -> torch.Tensor:
        """Whole-sequence forward. `causal=True` applies `frame_mask` [F, F] (True = may attend), by default the
        block-causal mask over chunks of `chunk_frames`. `frame_positions` [F] are RoPE time positions
        (default 0..F-1). `self_attention` replaces the self-attention call (e.g. sequence-parallel exchange,
        quantized K/V; with `causal=True` it is given the [S, S] token mask, otherwise `FrameMaskAttention` applies
        the frame mask without one). Returns the flow prediction with x's layout."""
        text = text_emb if isinstance(text_emb, TextContext) else self.prepare_text(text_emb)
        tokens, temb, mod, grid = self._embed(x, t)
        f, gh, gw = grid
        if frame_positions is None:
            frame_positions = torch.arange(f, device=x.device)
        mask = None
        if causal:
            if frame_mask is None:
                if chunk_frames is None:
                    raise ValueError("causal=True needs chunk_frames or frame_mask")
                frame_mask = block_causal_mask(chunk_ids(f, chunk_frames))
            if self_attention is None:  # grouped by mask row: no [S, S] token mask is built
                self_attention = FrameMaskAttention.for_mask(frame_mask, gh * gw)
            else:  # a custom self-attention gets the token mask
                mask = expand_frame_mask(frame_mask.to(x.device), gh * gw)
        elif frame_mask is not None:
            raise ValueError("frame_mask is only used with causal=True")
        rope = self._rope(frame_positions, grid)
        if self_attention is None:
            tokens = self._blocks(tokens, mod, rope, text, lambda i, q, k, v: attention(q, k, v))
        else:
            tokens = self._blocks(tokens, mod, rope, text, lambda i, q, k, v: self_attention(i, q, k, v, mask))
        return self._head(tokens, temb, grid)

    def forward_stream(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextContext,
        cache: KVCache | Attends,
        frame_positions: torch.Tensor,
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """One chunk against the cache (after `cache.begin_chunk`). The chunk's K/V land in its own slots;
        history is only read. With `need_output=False` (the cache-writing pass) the output head is skipped."""
        tokens, temb, mod, grid = self._embed(x, t)
        rope = self._rope(frame_positions.to(x.device), grid)
        tokens = self._blocks(tokens, mod, rope, text, cache.attend)
        return self._head(tokens, temb, grid) if need_output else None

    @torch.no_grad()
    def recache(self, cache: KVCache, text: TextContext, shard: "FrameShard | None" = None) -> None:
        """KV re-cache: recompute every cached frame's K/V from its clean latent under a new prompt (t = 0),
        each frame seeing the cached frames of its own and earlier chunks, positions unchanged. With a
        sequence-parallel `shard` this rank embeds only its share of the cached frames."""
        cached = cache.cached()
        if not cached:
            return
        slots = [s for s, _ in cached]
        start, end = shard.frame_range(len(cached)) if shard is not None else (0, len(cached))
        index = torch.tensor(slots[start:end], device=cache.device)
        x = cache.latents.index_select(2, index)
        positions = torch.tensor([info.position for _, info in cached[start:end]], dtype=torch.float64,
                                 device=cache.device)
        chunks = torch.tensor([info.chunk for _, info in cached])
        tokens, _, mod, grid = self._embed(x, torch.zeros(x.shape[0], device=x.device))
        # all cached frames in frame order (on head shards under SP), block-causal by chunk, no token mask
        frame_attention = FrameMaskAttention.for_mask(block_causal_mask(chunks), grid[1] * grid[2])

        def attend_and_store(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
            k, v = cache.write_frames(layer, slots, k, v)  # what the cache holds (quantized storage included)
            return frame_attention(layer, q, k, v)

        attend = (attend_and_store if shard is None
                  else shard.attention(attend_and_store, len(cached), grid[1] * grid[2]))
        self._blocks(tokens, mod, self._rope(positions, grid), text, attend)


def config_from_diffusers(cfg) -> TransformerConfig:
    """Our TransformerConfig from a diffusers WanTransformer3DModel config (dict-like)."""
    return TransformerConfig(
        num_attention_heads=cfg["num_attention_heads"],
        attention_head_dim=cfg["attention_head_dim"],
        num_layers=cfg["num_layers"],
        ffn_dim=cfg["ffn_dim"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"] or cfg["in_channels"],
        text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"],
        patch_size=tuple(cfg["patch_size"]),
        eps=cfg["eps"],
        cross_attn_norm=cfg["cross_attn_norm"],
    )


def config_dict(config: TransformerConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}

