"""Sequence parallelism: the (dp, sp) process mesh, Ulysses exchanges (optionally FP8/NVFP4 K/V) and the
Balanced SP layout of AR teacher forcing."""

from .balanced_sp import BalancedLayout, NaiveLayout, RankCounts, TeacherForcingLayout, make_layout
from .mesh import ParallelContext, ParallelError
from .ulysses import (
    KV_FORMATS,
    ExchangeStats,
    UlyssesAttention,
    attention_bytes_sent,
    cache_attention,
    dequantize_kv,
    even_splits,
    exchange,
    exchange_order,
    expand_frame_order,
    fake_quantize_kv,
    gather_seq,
    heads_to_seq,
    quantize_kv,
    seq_to_heads,
)

__all__ = [
    "BalancedLayout", "NaiveLayout", "RankCounts", "TeacherForcingLayout", "make_layout",
    "ParallelContext", "ParallelError",
    "KV_FORMATS", "ExchangeStats", "UlyssesAttention", "attention_bytes_sent", "cache_attention", "dequantize_kv",
    "even_splits", "exchange", "exchange_order", "expand_frame_order", "fake_quantize_kv", "gather_seq",
    "heads_to_seq", "quantize_kv", "seq_to_heads",
]
