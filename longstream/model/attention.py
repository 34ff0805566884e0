"""Attention visibility for the causal engine: frame-level masks and the attention call.

Masks here are frame-level booleans `mask[q_frame, k_frame]` (True = may attend); `expand_frame_mask` turns them
into token masks. The streaming path needs no mask at all: its KV cache only holds what a chunk may see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_ids(num_frames: int, chunk_frames: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.arange(num_frames, device=device) // chunk_frames


def block_causal_mask(chunk_of_frame: torch.Tensor) -> torch.Tensor:
    """A frame sees every frame of its own chunk and of earlier chunks (ids need not be contiguous)."""
    return chunk_of_frame[None, :] <= chunk_of_frame[:, None]


def sink_window_mask(num_frames: int, chunk_frames: int, window_frames: int, sink_frames: int) -> torch.Tensor:
    """Single-shot streaming visibility: chunk [s, e) sees the sink frames [0, sink) and frames
    [e - (window - sink), e) (its own chunk included), never later chunks."""
    q_chunk = chunk_ids(num_frames, chunk_frames)
    q_end = ((q_chunk + 1) * chunk_frames).clamp(max=num_frames)
    k = torch.arange(num_frames)
    causal = k[None, :] < q_end[:, None]
    recent = k[None, :] >= (q_end[:, None] - (window_frames - sink_frames))
    sink = (k < sink_frames)[None, :]
    return causal & (recent | sink)


def teacher_forcing_mask(num_frames: int, chunk_frames: int) -> torch.Tensor:
    """Mask for the sequence [clean frames 0..F-1, noisy frames 0..F-1] of AR teacher forcing.

    A clean frame sees clean frames of its own and earlier chunks; a noisy frame sees the noisy frames of its
    own chunk and the clean frames of strictly earlier chunks.
    """
    c = chunk_ids(num_frames, chunk_frames)
    same_or_earlier = c[None, :] <= c[:, None]
    same = c[None, :] == c[:, None]
    earlier = c[None, :] < c[:, None]
    top = torch.cat([same_or_earlier, torch.zeros_like(same)], dim=1)
    bottom = torch.cat([earlier, same], dim=1)
    return torch.cat([top, bottom], dim=0)


def expand_frame_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """[Fq, Fk] frame mask -> [Fq * T, Fk * T] token mask."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, S, D] tensors; `mask` is a boolean [Sq, Sk] (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
