"""Sequence layouts for sequence-parallel AR teacher forcing: naive and Balanced SP.

Standard order (as in `longstream.train.objectives.teacher_forcing_loss` and
`longstream.model.attention.teacher_forcing_mask`): 2F latent frames [clean 0..F-1, noisy 0..F-1]; clean frame f
has standard index f, noisy frame f has F + f; both copies of frame f use RoPE position f.

- Naive SP: the standard sequence cut into P contiguous pieces of 2F/P frames. Rank 0 holds only clean frames
  (no loss) and the last rank only noisy ones; every clean latent is needed by the ranks holding its clean copy
  and its noisy copy.
- Balanced SP: the F frames are cut into P contiguous time slices of L = F/P frames; rank r holds
  [clean frames of slice r, noisy frames of slice r] (2L frames, in that order). After the Ulysses all-to-all
  (rank-major) the sequence is [rank0 clean, rank0 noisy, rank1 clean, rank1 noisy, ...]: exchange index i
  decodes as rank = i // 2L, noisy = i % 2L >= L, frame = rank * L + i % L, and `BalancedLayout.frame_mask`
  builds the teacher-forcing mask from that decode, in that order (nothing is permuted after the exchange).

`local_frames(rank)` gives the standard indices a rank holds (in its local order), so a rank's inputs are
`x.index_select(dim, local_frames(rank))` for any per-frame tensor (latents, per-frame timesteps, positions),
and `permutation()` (their rank-major concatenation) maps exchange order to standard order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.attention import chunk_ids, expand_frame_mask, teacher_forcing_mask
from .mesh import ParallelError


@dataclass(frozen=True)
class RankCounts:
    """Work of one rank for one teacher-forcing sequence.

    tokens: tokens held; loss_tokens: noisy (loss-bearing) tokens held; query_pairs: allowed (query, key) token
    pairs of the rank's queries (attention work if attention were sharded by query); latent_frames: distinct clip
    frames whose clean latents the rank needs (its share of VAE encoding)."""

    rank: int
    tokens: int
    loss_tokens: int
    query_pairs: int
    latent_frames: int


@dataclass(frozen=True)
class TeacherForcingLayout:
    """Base: which standard frames each of `world` ranks holds (subclasses define `local_frames`)."""

    num_frames: int
    chunk_frames: int
    world: int

    def __post_init__(self) -> None:
        if self.num_frames <= 0 or self.chunk_frames <= 0 or self.world <= 0:
            raise ParallelError(f"{type(self).__name__} needs positive sizes, got num_frames={self.num_frames}, "
                                f"chunk_frames={self.chunk_frames}, world={self.world}")

    def local_frames(self, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ParallelError(f"rank {rank} outside an SP group of {self.world}")

    def permutation(self) -> torch.Tensor:
        """[2F] standard index of each frame in exchange order (rank-major concatenation of local frames)."""
        return torch.cat([self.local_frames(r) for r in range(self.world)])

    def frame_mask(self) -> torch.Tensor:
        """[2F, 2F] teacher-forcing frame mask in exchange order (the standard mask, permuted)."""
        perm = self.permutation()
        return teacher_forcing_mask(self.num_frames, self.chunk_frames)[perm][:, perm]

    def token_mask(self, tokens_per_frame: int) -> torch.Tensor:
        """[2F*T, 2F*T] token mask in exchange order (for an attention on head shards)."""
        return expand_frame_mask(self.frame_mask(), tokens_per_frame)

    def seq_splits(self, tokens_per_frame: int) -> list[int]:
        """Tokens per rank, for `UlyssesAttention(seq_splits=...)`."""
        return [len(self.local_frames(r)) * tokens_per_frame for r in range(self.world)]

    def shard(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        """Rank `rank`'s part of a per-frame tensor in standard order (frames along `dim`)."""
        return x.index_select(dim, self.local_frames(rank).to(x.device))

    def unshard(self, shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        """Per-rank parts (rank order) -> the tensor in standard order."""
        joined = torch.cat(list(shards), dim=dim)
        inverse = torch.argsort(self.permutation()).to(joined.device)
        return joined.index_select(dim, inverse)

    def counts(self, tokens_per_frame: int) -> list[RankCounts]:
        """Per-rank token, loss-token, query-pair and latent-frame counts (from the standard mask)."""
        f, t = self.num_frames, tokens_per_frame
        allowed_keys = teacher_forcing_mask(f, self.chunk_frames).sum(dim=1)  # per standard query frame
        out = []
        for r in range(self.world):
            idx = self.local_frames(r)
            out.append(RankCounts(
                rank=r,
                tokens=len(idx) * t,
                loss_tokens=int((idx >= f).sum()) * t,
                query_pairs=int(allowed_keys[idx].sum()) * t * t,
                latent_frames=len(set((idx % f).tolist())),
            ))
        return out


class NaiveLayout(TeacherForcingLayout):
    """Contiguous split of [clean 0..F-1, noisy 0..F-1] into P pieces of 2F/P frames."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (2 * self.num_frames) % self.world:
            raise ParallelError(f"naive SP needs 2 x {self.num_frames} frames divisible by SP size {self.world}")

    def local_frames(self, rank: int) -> torch.Tensor:
        self._check_rank(rank)
        n = 2 * self.num_frames // self.world
        return torch.arange(rank * n, (rank + 1) * n)


class BalancedLayout(TeacherForcingLayout):
    """Rank r holds [clean slice r, noisy slice r] of P contiguous time slices (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames % self.world:
            raise ParallelError(
                f"Balanced SP needs the latent frames ({self.num_frames}) divisible by the SP size ({self.world}); "
                f"use a clip of {self.num_frames - self.num_frames % self.world} or "
                f"{self.num_frames + self.world - self.num_frames % self.world} latent frames"
            )

    @property
    def slice_frames(self) -> int:
        return self.num_frames // self.world

    def local_frames(self, rank: int) -> torch.Tensor:
        self._check_rank(rank)
        s = torch.arange(rank * self.slice_frames, (rank + 1) * self.slice_frames)
        return torch.cat([s, s + self.num_frames])

    def decode(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exchange-order frame index -> (rank, noisy, clip frame)."""
        per_rank = 2 * self.slice_frames
        rank = index // per_rank
        within = index % per_rank
        noisy = within >= self.slice_frames
        frame = rank * self.slice_frames + within % self.slice_frames
        return rank, noisy, frame

    def frame_mask(self) -> torch.Tensor:
        """Teacher-forcing frame mask built directly in exchange order: a clean frame sees clean frames of its own
        and earlier chunks; a noisy frame sees noisy frames of its own chunk and clean frames of earlier chunks."""
        i = torch.arange(2 * self.num_frames)
        _, noisy, frame = self.decode(i)
        c = chunk_ids(self.num_frames, self.chunk_frames)[frame]
        qn, kn = noisy[:, None], noisy[None, :]
        qc, kc = c[:, None], c[None, :]
        clean_q = ~qn & ~kn & (kc <= qc)
        noisy_q = qn & ((~kn & (kc < qc)) | (kn & (kc == qc)))
        return clean_q | noisy_q


LAYOUTS = {"naive": NaiveLayout, "balanced": BalancedLayout}


def make_layout(kind: str, num_frames: int, chunk_frames: int, world: int) -> TeacherForcingLayout:
    """`kind` is "naive" or "balanced"."""
    if kind not in LAYOUTS:
        raise ParallelError(f"unknown SP layout {kind!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[kind](num_frames, chunk_frames, world)
