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


class FrameMaskAttention:
    """Attention under a frame-level mask without building the token mask.

    Query frames whose mask rows are equal form a group; a group attends by one unmasked SDPA over the key frames
    its row allows, so no [S, S] token mask exists (a 5B teacher-forcing token mask at 128 latent frames would take
    47 GiB) and the fast unmasked SDPA kernels apply. Teacher forcing has 2 x chunks groups, block-causal attention
    one per chunk. Contiguous frame ranges are taken as views; others (a noisy teacher-forcing chunk's keys: the
    earlier clean frames and its own chunk) are gathered copies, which autograd keeps for the backward pass.
    Equal to `attention(q, k, v, expand_frame_mask(frame_mask, tokens_per_frame))` up to float summation order.
    Rows with no key are refused. `for_mask` caches instances per (mask, tokens per frame).
    Call: (layer, q, k, v, mask=None) with q [B, H, Fq * T, D], k and v [B, H, Fk * T, D], like a `MaskedAttention`.
    """

    def __init__(self, frame_mask: torch.Tensor, tokens_per_frame: int) -> None:
        frame_mask = frame_mask.cpu()
        if not frame_mask.any(dim=1).all():
            raise ValueError("a query frame of the frame mask sees no key frame")
        rows, group = torch.unique(frame_mask, dim=0, return_inverse=True)
        self.tokens_per_frame = tokens_per_frame
        self.shape = (frame_mask.shape[0] * tokens_per_frame, frame_mask.shape[1] * tokens_per_frame)
        self.groups = [(_token_index(torch.nonzero(group == g)[:, 0], tokens_per_frame),
                        _token_index(torch.nonzero(row)[:, 0], tokens_per_frame)) for g, row in enumerate(rows)]
        self._on: dict[torch.device, list[tuple[slice | torch.Tensor, slice | torch.Tensor]]] = {}

    @staticmethod
    def for_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> "FrameMaskAttention":
        """A cached instance for a CPU mask (the model's causal forward builds one per call)."""
        key = (tuple(frame_mask.shape), frame_mask.cpu().numpy().tobytes(), tokens_per_frame)
        if key not in _CACHE:
            if len(_CACHE) >= 32:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = FrameMaskAttention(frame_mask, tokens_per_frame)
        return _CACHE[key]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None or (q.shape[2], k.shape[2]) != self.shape:
            raise ValueError(f"FrameMaskAttention takes no token mask, {self.shape[0]} query and {self.shape[1]} key "
                             f"tokens; got {q.shape[2]} and {k.shape[2]}")
        if q.device not in self._on:
            self._on[q.device] = [(_as_slice(qi, q.device), _as_slice(ki, q.device)) for qi, ki in self.groups]
        out = torch.empty_like(q)
        for qi, ki in self._on[q.device]:
            out[:, :, qi] = F.scaled_dot_product_attention(q[:, :, qi], k[:, :, ki], v[:, :, ki])
        return out


_CACHE: dict[tuple, FrameMaskAttention] = {}


def _token_index(frames: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    return (frames[:, None] * tokens_per_frame + torch.arange(tokens_per_frame)[None, :]).reshape(-1)


def _as_slice(index: torch.Tensor, device: torch.device) -> slice | torch.Tensor:
    """A slice (a view when indexing) if `index` is one contiguous run, else the index on `device`."""
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == len(index) and torch.equal(index, torch.arange(first, last + 1)):
        return slice(first, last + 1)
    return index.to(device)
