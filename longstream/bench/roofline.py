"""Roofline of one streaming chunk: FLOPs and bytes counted from the model config, and the FPS they allow.

A chunk of `chunk_frames` latent frames at a full KV window runs `steps + 1` transformer passes: the denoising
passes and the cache-writing pass at t = 0 (which skips the output head). Q = chunk_frames * tokens_per_frame
query tokens, K = window_frames * tokens_per_frame keys (the chunk's own frames included), D = dim.

FLOPs (a multiply-add counts 2):
- linears: 2 * in * out per row of every GEMM. Per token and pass: the patch embedding (a strided Conv3d, i.e. a
  GEMM over C_in * patch-volume inputs) and, per block, self-attention q/k/v/out, cross-attention q/out and FFN
  up/down; per token of the denoising passes the output head; per latent frame and pass the timestep embedding
  (time_embedder, time_proj). Not counted: the text projection and the cross-attention K/V, made once per prompt.
- attention: 4 * Q * keys * D per layer and pass (QK^T and PV), keys = K for self-attention plus the text tokens
  for cross-attention. Softmax, norms, RoPE and elementwise work are not counted.

Bytes (the least traffic of an implementation that runs each GEMM and attention call as its own kernel): every
weight a pass uses read once in its stored format (bf16 / fp8 rowwise / nvfp4; layers the mode keeps in high
precision in the compute dtype), the window's K and V read once and the chunk's K and V written once in the
cache's format, the text K/V read, and per token each GEMM's input and output and each attention call's query and
output in the compute dtype. Biases are not counted.

Ceiling: time per chunk >= max(linear FLOPs / peak of the linear format + attention FLOPs / bf16 peak,
bytes / bandwidth), and the FPS ceiling is the chunk's video frames (chunk_frames * VAE temporal factor) over that
time. It bounds the DiT alone: the VAE decode is not in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import StreamConfig, TransformerConfig
from ..quant.linear import unsupported_reason

# Default peaks, H100 SXM: dense GEMM TFLOP/s per linear format (bench/RESULTS.md measures bf16 650-736 and fp8
# 1119-1373 on the 5B shapes) and copy bandwidth in TB/s. NVFP4 on Hopper runs on the bf16 tensor cores (exact
# emulation), hence the bf16 figure; pass the device's own figures (Blackwell FP4, H200 bandwidth) to override.
PEAK_TFLOPS: dict[str, float] = {"bf16": 780.0, "fp8": 1300.0, "nvfp4": 780.0}
PEAK_TBPS = 3.0
KV_SCALE_BYTES = 4  # quantized caches: one float32 scale per (head, frame) for K and one for V


@dataclass(frozen=True)
class ChunkCost:
    """Work of one chunk at a full window: FLOPs by kind, bytes moved, video frames it becomes."""

    linear_flops: int
    attention_flops: int
    bytes: int
    video_frames: int

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops


@dataclass(frozen=True)
class Ceiling:
    """Lower bounds on the time of a chunk (s) and the FPS they allow."""

    compute_s: float
    memory_s: float
    fps: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def block_linear_shapes(cfg: TransformerConfig) -> list[tuple[int, int]]:
    """(out, in) of one block's per-token GEMMs: self-attention q, k, v, out; cross-attention q, out; FFN up, down."""
    d = cfg.dim
    return [(d, d)] * 6 + [(cfg.ffn_dim, d), (d, cfg.ffn_dim)]


def _weight_bytes(out_f: int, in_f: int, mode: str, element_bytes: int) -> int:
    if mode == "bf16" or unsupported_reason(in_f, out_f, mode):
        return out_f * in_f * element_bytes
    if mode == "fp8":
        return out_f * in_f + 4 * out_f  # e4m3 elements + a float32 scale per output channel
    return out_f * in_f // 2 + out_f * in_f // 16 + 4  # fp4 pairs + e4m3 block scales + the global scale


def _kv_frame_bytes(kv_cache: str, elements: int, heads: int, element_bytes: int) -> int:
    """Bytes of one latent frame's K (or V), `elements` = tokens_per_frame * dim, in a cache of kind `kv_cache`."""
    if kv_cache == "dense":
        return elements * element_bytes
    if kv_cache == "fp8":
        return elements + KV_SCALE_BYTES * heads
    return elements // 2 + elements // 16 + KV_SCALE_BYTES * heads  # nvfp4: fp4 pairs + e4m3 block scales


def chunk_cost(
    cfg: TransformerConfig,
    stream: StreamConfig,
    tokens_per_frame: int,
    *,
    text_tokens: int,
    temporal: int,
    linear: str = "bf16",
    kv_cache: str = "dense",
    element_bytes: int = 2,
) -> ChunkCost:
    """FLOPs and bytes of one chunk at a full window (see the module docstring for what is counted)."""
    d, layers, frames = cfg.dim, cfg.num_layers, stream.chunk_frames
    passes = stream.steps + 1
    q = frames * tokens_per_frame
    patch_in = cfg.in_channels * math.prod(cfg.patch_size)
    head_out = cfg.out_channels * math.prod(cfg.patch_size)
    block = block_linear_shapes(cfg)
    per_frame = cfg.freq_dim * d + d * d + d * 6 * d  # time_embedder linear_1, linear_2; time_proj
    per_token = layers * sum(o * i for o, i in block) + patch_in * d
    linear_flops = 2 * (passes * (q * per_token + frames * per_frame) + stream.steps * q * d * head_out)
    attention_flops = 4 * passes * layers * q * d * (stream.window_frames * tokens_per_frame + text_tokens)

    e = element_bytes
    weights = layers * sum(_weight_bytes(o, i, linear, e) for o, i in block) + (patch_in * d + per_frame) * e
    kv_frame = _kv_frame_bytes(kv_cache, tokens_per_frame * d, cfg.num_attention_heads, e)
    kv = layers * (2 * (stream.window_frames + frames) * kv_frame + 2 * text_tokens * d * e)
    activations = q * (layers * (sum(o + i for o, i in block) + 4 * d) + patch_in + d) * e
    head = (head_out * d + q * (d + head_out)) * e  # the output head's weight and activations
    total = passes * (weights + kv + activations) + stream.steps * head
    return ChunkCost(linear_flops, attention_flops, total, frames * temporal)


def ceiling(cost: ChunkCost, linear: str, peak_tflops: dict[str, float], peak_tbps: float) -> Ceiling:
    """Compute and memory bounds of a chunk and the FPS ceiling (attention always at the bf16 peak)."""
    compute = cost.linear_flops / (peak_tflops[linear] * 1e12) + cost.attention_flops / (peak_tflops["bf16"] * 1e12)
    memory = cost.bytes / (peak_tbps * 1e12)
    return Ceiling(compute, memory, cost.video_frames / max(compute, memory))
