"""Per-layer KV cache of the streaming engine: attention-sink frames plus a ring of recent frames.

Layout. Each layer stores keys (RoPE already applied) and values for `window_frames` frame slots:
`sink_frames` sink slots followed by `window_frames - sink_frames` ring slots, each slot holding one latent
frame's tokens. A chunk being generated writes its K/V straight into the slots it will own (the ring slots of the
oldest frames, which it may no longer see), attends over every occupied slot, and the cache advances only when
the chunk is committed. So denoising passes leave the visible history untouched, no K/V is ever copied or rolled,
and a query always sees at most `window_frames` frames, its own chunk included (LongLive's `local_attn_size`).
Attention is order-free over keys, so physical slot order does not matter.

Sink frames. A frame is "sink-eligible" when it is among the first `sink_frames` frames of the video (or, with a
multi-shot sink, of its shot). Eligible frames go to the sink slots; once those are full the oldest sink frame
is replaced (first in, first out). Every other frame goes to the ring.

Storage. `KVStorage` is the hook for quantized storage: `write` stores K/V at token indices (whole frames; it
may quantize them in place), `read` returns the first `n` tokens in the compute dtype. Kinds: `dense` (the
compute dtype), `fp8` and `nvfp4` (`longstream.quant.kv_storage`); register more with `register_storage`.
With `attention="fp8"` an `fp8` cache is attended to from its codes, both matmuls in FP8 (`FP8KVStorage.attend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ..quant.kv_storage import FP8KVStorage, NVFP4KVStorage
from .attention import attention


class KVStorage(Protocol):
    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, H, n, D] at token positions `index` [n]."""

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of token positions [0, length) as [B, H, length, D] in the compute dtype."""

    def nbytes(self) -> int:
        """Bytes held."""


class DenseKVStorage:
    """Plain K/V tensors in the compute dtype."""

    def __init__(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device,
                 tokens_per_frame: int = 1) -> None:
        self.k = torch.zeros(batch, heads, tokens, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, :length], self.v[:, :, :length]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


ATTENTION_KINDS = ("bf16", "fp8")


def check_attention(attention: str, storage: str) -> None:
    """`bf16`: SDPA in the compute dtype over the storage's read. `fp8`: both matmuls in FP8 straight from an
    `fp8` cache's codes (`quant.fp8_attention`)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    if attention == "fp8" and storage != "fp8":
        raise ValueError(f"fp8 attention reads an fp8 KV cache; got KV storage {storage!r}")


StorageFactory = Callable[..., KVStorage]
_STORAGE: dict[str, StorageFactory] = {"dense": DenseKVStorage, "fp8": FP8KVStorage, "nvfp4": NVFP4KVStorage}


def register_storage(name: str, factory: StorageFactory) -> None:
    _STORAGE[name] = factory


def storage_kinds() -> list[str]:
    return sorted(_STORAGE)


@dataclass(frozen=True)
class _AttendState:
    """What a pending chunk's passes attend over: its token positions, the visible length and, when some slots
    below it are empty, the visibility of each token and of each frame slot."""

    index: torch.Tensor
    length: int
    key_mask: torch.Tensor | None
    slot_mask: torch.Tensor | None


@dataclass
class SlotInfo:
    """What a slot holds: a latent frame, its RoPE position and the chunk it was generated in."""

    frame: int
    position: float
    chunk: int


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        latent_shape: tuple[int, int, int],
        sink_frames: int,
        window_frames: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        storage: str = "dense",
        attention: str = "bf16",
    ) -> None:
        if window_frames <= sink_frames:
            raise ValueError(f"window_frames ({window_frames}) must exceed sink_frames ({sink_frames})")
        if storage not in _STORAGE:
            raise ValueError(f"unknown KV storage {storage!r}; choose one of {', '.join(storage_kinds())}")
        check_attention(attention, storage)
        self.attention = attention
        self.tokens_per_frame = tokens_per_frame
        self.sink_capacity = sink_frames
        self.ring_capacity = window_frames - sink_frames
        self.num_slots = window_frames
        self.device = torch.device(device)
        tokens = window_frames * tokens_per_frame
        self.layers: list[KVStorage] = [
            _STORAGE[storage](batch, heads, tokens, head_dim, dtype, device, tokens_per_frame=tokens_per_frame)
            for _ in range(num_layers)
        ]
        channels, height, width = latent_shape
        # Clean latents of the cached frames: what a re-cache recomputes K/V from.
        self.latents = torch.zeros(batch, channels, window_frames, height, width, dtype=dtype, device=device)
        self.slots: list[SlotInfo | None] = [None] * window_frames
        self._sink_order: list[int] = []  # sink slots, oldest first
        self._ring_written = 0
        self._pending: list[tuple[int, SlotInfo]] = []
        self._pending_sink_order: list[int] = []
        self._pending_ring_next = 0
        self._attend_state: _AttendState | None = None

    # -- slot bookkeeping -------------------------------------------------------------------------------------
    def begin_chunk(
        self, frames: Sequence[int], sink_eligible: Sequence[bool], positions: Sequence[float], chunk: int
    ) -> None:
        """Assign slots to a chunk's frames; its passes write there until `commit`."""
        sink_order = list(self._sink_order)
        ring_next = self._ring_written
        pending = []
        for frame, eligible, pos in zip(frames, sink_eligible, positions):
            info = SlotInfo(int(frame), float(pos), int(chunk))
            if eligible and self.sink_capacity > 0:
                if len(sink_order) < self.sink_capacity:
                    slot = len(sink_order)
                else:
                    slot = sink_order.pop(0)
                sink_order.append(slot)
            else:
                slot = self.sink_capacity + ring_next % self.ring_capacity
                ring_next += 1
            pending.append((slot, info))
        if len({s for s, _ in pending}) != len(pending):
            raise ValueError("chunk is larger than the cache can hold at once; raise window_frames")
        self._pending = pending
        self._pending_sink_order = sink_order
        self._pending_ring_next = ring_next
        self._attend_state = self._visible_state([s for s, _ in pending])

    def commit(self, clean_latents: torch.Tensor) -> None:
        """Make the pending chunk permanent; `clean_latents` [B, C, F, h, w] are kept for re-caching."""
        if not self._pending:
            raise RuntimeError("commit() without begin_chunk()")
        slots = torch.tensor([s for s, _ in self._pending], device=self.device)
        self.latents.index_copy_(2, slots, clean_latents.to(self.latents.dtype))
        for slot, info in self._pending:
            self.slots[slot] = info
        self._sink_order = self._pending_sink_order
        self._ring_written = self._pending_ring_next
        self._pending = []
        self._attend_state = None

    def cached(self) -> list[tuple[int, SlotInfo]]:
        """Occupied (slot, info) pairs in frame order."""
        used = [(i, s) for i, s in enumerate(self.slots) if s is not None]
        return sorted(used, key=lambda item: item[1].frame)

    def _token_index(self, slots: Sequence[int]) -> torch.Tensor:
        t = self.tokens_per_frame
        base = torch.tensor(list(slots), device=self.device) * t
        return (base[:, None] + torch.arange(t, device=self.device)[None, :]).reshape(-1)

    def _visible_state(self, chunk_slots: Sequence[int]) -> _AttendState:
        visible = [s is not None for s in self.slots]
        for s in chunk_slots:
            visible[s] = True
        n = max(i for i, v in enumerate(visible) if v) + 1
        slot_mask = key_mask = None
        if not all(visible[:n]):
            slot_mask = torch.tensor(visible[:n], device=self.device)
            key_mask = slot_mask.repeat_interleave(self.tokens_per_frame)
        return _AttendState(self._token_index(chunk_slots), n * self.tokens_per_frame, key_mask, slot_mask)

    # -- attention ----------------------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of the pending chunk: write its k, v [B, H, S, D] to its slots, attend over the cache."""
        return self._attend_stored(layer, q, lambda store, index: store.write(index, k, v))

    def attend_fields(self, layer: int, q: torch.Tensor, k_fields, v_fields) -> torch.Tensor:
        """`attend` with K and V already quantized in this cache's format (the wire fields of the sequence-parallel
        exchange, `parallel.ulysses.quantize_kv`): stored as they are, so the cache holds the same bytes as a
        single process quantizing the original values."""
        return self._attend_stored(layer, q, lambda store, index: store.write_fields(index, k_fields, v_fields))

    def _attend_stored(self, layer: int, q: torch.Tensor, store_chunk: Callable) -> torch.Tensor:
        """`store_chunk(storage, index)` puts the pending chunk's K/V in its slots; then q attends over the cache."""
        if self._attend_state is None:
            raise RuntimeError("attend() outside a chunk: call begin_chunk() first")
        state = self._attend_state
        store = self.layers[layer]
        store_chunk(store, state.index)
        if self.attention == "fp8":
            return store.attend(q, state.length, state.slot_mask)
        keys, values = store.read(state.length)
        return attention(q, keys, values, None if state.key_mask is None else state.key_mask[None, :])

    def write_frames(
        self, layer: int, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Overwrite the K/V of cached frames (re-cache); returns them as stored (after any quantization)."""
        index = self._token_index(slots)
        store = self.layers[layer]
        store.write(index, k, v)
        keys, values = store.read(self.num_slots * self.tokens_per_frame)
        return keys.index_select(2, index), values.index_select(2, index)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
