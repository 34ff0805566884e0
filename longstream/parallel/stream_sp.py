"""Sequence-parallel streaming: how the ranks of an SP group share each chunk.

Every rank runs the same chunk loop, sampler and cache bookkeeping on the full latent chunk (small), but the
transformer only sees this rank's contiguous share of the chunk's latent frames (`even_splits`, larger shares
first). Self-attention goes through Ulysses all-to-alls; each rank's KV cache holds its share of the heads for
all cached tokens. The rank-major exchange order is then plain frame order, so cache slots and masks need no
permutation. Velocities are all-gathered after each pass, so every rank continues with identical tensors and
the result equals a single-process run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..model.transformer import MaskedAttention
from .ulysses import UlyssesAttention, even_splits, gather_seq, group_rank, group_size


class StreamShard:
    def __init__(self, group: "dist.ProcessGroup | None", kv_format: str = "dense") -> None:
        self.group, self.kv_format = group, kv_format
        self.world, self.rank = group_size(group), group_rank(group)

    def frame_range(self, frames: int) -> tuple[int, int]:
        """This rank's [start, end) of `frames` latent frames."""
        if frames < self.world:
            raise ValueError(f"{frames} latent frames cannot be shared by {self.world} sequence-parallel ranks")
        splits = even_splits(frames, self.world)
        start = sum(splits[: self.rank])
        return start, start + splits[self.rank]

    def heads(self, heads: int) -> int:
        return even_splits(heads, self.world)[self.rank]

    def attention(
        self, inner: MaskedAttention, frames: int, tokens_per_frame: int, mask: torch.Tensor | None = None,
        fields_inner: Callable[..., torch.Tensor] | None = None,
    ) -> UlyssesAttention:
        """Self-attention over `frames` frames shared by the ranks; `inner` works on head shards in frame order
        (`fields_inner`, when given, takes quantized K/V as they arrive instead: see `UlyssesAttention`).
        The result is a `(layer, q, k, v)` function and, through `.attend`, a stand-in for a cache."""
        splits = [n * tokens_per_frame for n in even_splits(frames, self.world)]
        return UlyssesAttention(self.group, splits, inner, mask=mask, kv_format=self.kv_format,
                                tokens_per_frame=tokens_per_frame, fields_inner=fields_inner)

    def gather(self, local: torch.Tensor, frames: int, dim: int) -> torch.Tensor:
        """All ranks' shares of a `frames`-frame tensor, concatenated along `dim`."""
        return gather_seq(local.contiguous(), self.group, even_splits(frames, self.world), dim)
