"""Ulysses sequence parallelism: all-to-all exchanges between sequence shards and head shards.

Layouts (P ranks of an SP group, group rank r):
- sequence shard: [B, H, S_r, D], this rank's S_r tokens, all H heads. The caller chooses the token counts
  `seq_splits` = [S_0, ..., S_{P-1}] (any sizes, zeros allowed).
- head shard: [B, H_r, S, D], all S = sum(seq_splits) tokens, this rank's H_r heads. Heads are split into
  contiguous blocks as evenly as possible, larger blocks first (`even_splits(H, P)`): rank r owns heads
  [sum(H_<r), sum(H_<=r)).
- global token order (the order of S in a head shard): rank-major concatenation of the sequence shards, i.e. the
  tokens of rank 0 in their local order, then those of rank 1, ... . If rank r holds the tokens `idx_r` of some
  reference order, `exchange_order([idx_0, ..., idx_{P-1}])` is the permutation `perm` with
  global[i] = reference[perm[i]]; a reference mask M becomes `M[perm][:, perm]` in exchange order.

`group=None` means no parallelism: the exchanges are identities (seq_splits must then have one entry).

Quantized K/V exchange (`kv_format`): "dense" sends K and V as they are; "fp8" and "nvfp4" send them in the
formats of `longstream.quant.kv_storage` (one float32 scale per (batch, head, latent frame); NVFP4 1x16 blocks
along head_dim with E4M3 block scales), packed as bytes with their scales into the same all-to-all as Q, and
dequantized by the receiver, or (`fields_inner`) handed over as they arrive, e.g. to a KV cache of the same
format that stores them without quantizing again (`KVCache.attend_fields`). Quantization is per (batch, head,
frame), so each sequence shard must hold whole latent frames and the result equals `fake_quantize_kv` applied
to the whole sequence. Q and the attention output always travel in the compute dtype. Float8 is sent as uint8
(gloo has no float8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..model.attention import attention
from ..model.transformer import MaskedAttention
from ..quant import nvfp4
from ..quant.kv_storage import FP8KVStorage, NVFP4KVStorage

KV_FORMATS = ("dense", "fp8", "nvfp4")


# -- sizes ----------------------------------------------------------------------------------------------------------
def even_splits(n: int, parts: int) -> list[int]:
    """n split into `parts` contiguous counts as evenly as possible, larger counts first."""
    if parts <= 0 or n < 0:
        raise ValueError(f"cannot split {n} into {parts} parts")
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def group_size(group: "dist.ProcessGroup | None") -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: "dist.ProcessGroup | None") -> int:
    return 0 if group is None else dist.get_rank(group)


def exchange_order(local_indices: Sequence[torch.Tensor | Sequence[int]]) -> torch.Tensor:
    """Global (exchange) order from each rank's reference indices: rank-major concatenation."""
    return torch.cat([torch.as_tensor(i, dtype=torch.long).reshape(-1) for i in local_indices])


def expand_frame_order(frame_order: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """A permutation of frames -> the permutation of their tokens (T consecutive tokens per frame)."""
    t = torch.arange(tokens_per_frame, device=frame_order.device)
    return (frame_order.long()[:, None] * tokens_per_frame + t[None, :]).reshape(-1)


# -- traffic accounting -------------------------------------------------------------------------------------------
@dataclass
class ExchangeStats:
    """Bytes this rank sent to other ranks (its own share is not counted), by tensor name."""

    calls: int = 0
    bytes_sent: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.calls = 0
        self.bytes_sent.clear()


# -- the exchange -------------------------------------------------------------------------------------------------
def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.numel() == 0:
        return torch.empty(*x.shape[:-1], x.shape[-1] * x.element_size(), dtype=torch.uint8, device=x.device)
    if x.stride(-1) != 1:
        x = torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)
    return x.view(torch.uint8)  # last dim grows by the element size


def _all_to_all(
    fields: Sequence[torch.Tensor],
    group: "dist.ProcessGroup | None",
    split_dim: int,
    cat_dim: int,
    send_splits: Sequence[Sequence[int]],
    recv_splits: Sequence[Sequence[int]],
    names: Sequence[str] | None = None,
    stats: ExchangeStats | None = None,
) -> list[torch.Tensor]:
    """One all-to-all carrying several tensors as bytes.

    Field i is split along `split_dim` into `send_splits[i]` (piece j goes to rank j) and the pieces received
    from ranks 0..P-1 are concatenated along `cat_dim`, with sizes `recv_splits[i]`. Every rank must pass the
    same split lists; all other dims must agree across ranks. split_dim and cat_dim may not be the last dim."""
    world, me = group_size(group), group_rank(group)
    ndim = fields[0].ndim
    if split_dim in (-1, ndim - 1) or cat_dim in (-1, ndim - 1) or split_dim == cat_dim:
        raise ValueError("split and concatenation dims must differ and not be the last dim")
    plans = []
    for i, x in enumerate(fields):
        ss, rs = [int(s) for s in send_splits[i]], [int(s) for s in recv_splits[i]]
        if len(ss) != world or len(rs) != world:
            raise ValueError(f"split lists need {world} entries (group size), got {len(ss)} and {len(rs)}")
        if x.shape[split_dim] != sum(ss):
            raise ValueError(f"dim {split_dim} has size {x.shape[split_dim]}, splits {ss} sum to {sum(ss)}")
        if x.shape[cat_dim] != rs[me]:
            raise ValueError(f"dim {cat_dim} has size {x.shape[cat_dim]} but this rank's split is {rs[me]}")
        plans.append((x, _as_bytes(x), ss, rs))
    if world == 1:
        return [x for x, *_ in plans]

    # send buffer: for each destination j, field 0's piece j, field 1's piece j, ... (split dim moved first)
    piece_sizes = [[b.numel() // max(b.shape[split_dim], 1) * ss[j] if b.shape[split_dim] else 0
                    for j in range(world)] for _, b, ss, _ in plans]
    in_splits = [sum(sizes[j] for sizes in piece_sizes) for j in range(world)]
    device = fields[0].device
    send = torch.empty(sum(in_splits), dtype=torch.uint8, device=device)
    offset = 0
    for j in range(world):
        for (_, b, ss, _), sizes in zip(plans, piece_sizes):
            piece = b.narrow(split_dim, sum(ss[:j]), ss[j]).movedim(split_dim, 0)
            send[offset: offset + sizes[j]].view(piece.shape).copy_(piece)
            offset += sizes[j]

    # receive: from source j, field i's piece has split dim ss[me] and cat dim rs[j]
    shapes = []
    for _, b, ss, rs in plans:
        per_src = []
        for j in range(world):
            shape = list(b.shape)
            shape[split_dim], shape[cat_dim] = ss[me], rs[j]
            per_src.append(shape)
        shapes.append(per_src)
    out_splits = [sum(_numel(shapes[i][j]) for i in range(len(plans))) for j in range(world)]
    recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)

    outs = []
    for i, (x, b, ss, rs) in enumerate(plans):
        shape = list(b.shape)
        shape[split_dim], shape[cat_dim] = ss[me], sum(rs)
        outs.append(torch.empty(shape, dtype=torch.uint8, device=device))
    offset = 0
    for j in range(world):
        for i, (_, _, _, rs) in enumerate(plans):
            shape = shapes[i][j]
            n = _numel(shape)
            moved = [shape[split_dim]] + [s for d, s in enumerate(shape) if d != split_dim]
            piece = recv[offset: offset + n].view(moved).movedim(0, split_dim)
            outs[i].narrow(cat_dim, sum(rs[:j]), rs[j]).copy_(piece)
            offset += n
    if stats is not None:
        stats.calls += 1
        for i, sizes in enumerate(piece_sizes):
            name = names[i] if names is not None else f"field{i}"
            stats.add(name, sum(s for j, s in enumerate(sizes) if j != me))
    return [o.view(x.dtype) if x.dtype != torch.uint8 else o for o, (x, *_) in zip(outs, plans)]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class _Exchange(torch.autograd.Function):
    """Differentiable all-to-all of several tensors; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, meta: tuple, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        group, split_dim, cat_dim, send, recv, names, stats = meta
        ctx.meta = (group, split_dim, cat_dim, send, recv)
        return tuple(_all_to_all(xs, group, split_dim, cat_dim, send, recv, names, stats))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:  # type: ignore[override]
        group, split_dim, cat_dim, send, recv = ctx.meta
        grads = [g.contiguous() for g in grads]
        back = _all_to_all(grads, group, cat_dim, split_dim, recv, send)
        return (None, *back)


def exchange(
    xs: Sequence[torch.Tensor],
    group: "dist.ProcessGroup | None",
    split_dim: int,
    cat_dim: int,
    send_splits: Sequence[Sequence[int]],
    recv_splits: Sequence[Sequence[int]],
    *,
    names: Sequence[str] | None = None,
    stats: ExchangeStats | None = None,
) -> list[torch.Tensor]:
    """All-to-all of several tensors in one collective (see `_all_to_all`), differentiable."""
    if group_size(group) == 1:
        return list(_all_to_all(xs, None, split_dim, cat_dim, send_splits, recv_splits))
    meta = (group, split_dim, cat_dim, [list(s) for s in send_splits], [list(s) for s in recv_splits], names, stats)
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return list(_Exchange.apply(meta, *xs))
    return _all_to_all(xs, group, split_dim, cat_dim, meta[3], meta[4], names, stats)


def _check_seq(group, seq_splits: Sequence[int]) -> list[int]:
    world = group_size(group)
    splits = [int(s) for s in seq_splits]
    if len(splits) != world:
        raise ValueError(f"seq_splits has {len(splits)} entries for an SP group of {world}")
    if any(s < 0 for s in splits):
        raise ValueError(f"negative token count in seq_splits {splits}")
    return splits


def seq_to_heads(
    x: torch.Tensor,
    group: "dist.ProcessGroup | None",
    seq_splits: Sequence[int],
    head_splits: Sequence[int] | None = None,
) -> torch.Tensor:
    """[B, H, S_r, D] (this rank's tokens, all heads) -> [B, H_r, S, D] (all tokens in exchange order, this
    rank's heads). `head_splits` defaults to `even_splits(H, P)`."""
    splits = _check_seq(group, seq_splits)
    heads = list(head_splits) if head_splits is not None else even_splits(x.shape[1], len(splits))
    return exchange([x], group, 1, 2, [heads], [splits])[0]


def heads_to_seq(
    x: torch.Tensor,
    group: "dist.ProcessGroup | None",
    seq_splits: Sequence[int],
    head_splits: Sequence[int] | None = None,
    num_heads: int | None = None,
) -> torch.Tensor:
    """[B, H_r, S, D] -> [B, H, S_r, D], the inverse of `seq_to_heads`. Give `head_splits` or `num_heads`
    (default: H_r times P, right when heads divide evenly)."""
    splits = _check_seq(group, seq_splits)
    if head_splits is None:
        total = num_heads if num_heads is not None else x.shape[1] * len(splits)
        head_splits = even_splits(total, len(splits))
    return exchange([x], group, 2, 1, [splits], [list(head_splits)])[0]


def gather_seq(
    x: torch.Tensor, group: "dist.ProcessGroup | None", splits: Sequence[int], dim: int
) -> torch.Tensor:
    """All-gather of shards of uneven sizes `splits` along `dim`, concatenated in rank order (not
    differentiable; e.g. a chunk's clean latent frames for decoding and the cache)."""
    splits = _check_seq(group, splits)
    if len(splits) == 1:
        return x
    if x.shape[dim] != splits[group_rank(group)]:
        raise ValueError(f"local size {x.shape[dim]} along dim {dim} differs from its split")
    top = max(splits)
    pad_shape = list(x.shape)
    pad_shape[dim] = top - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in splits]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, splits)], dim=dim)


# -- quantized K/V payloads -----------------------------------------------------------------------------------------
def _frames(x: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    b, h, s, d = x.shape
    if s % tokens_per_frame:
        raise ValueError(f"{s} tokens are not whole frames of {tokens_per_frame} tokens")
    return x.float().reshape(b, h, s // tokens_per_frame, tokens_per_frame, d)


def quantize_kv(x: torch.Tensor, kv_format: str, tokens_per_frame: int) -> list[torch.Tensor]:
    """K or V [B, H, S, D] (whole frames) -> wire fields, each [B, H, S or F, width]:
    fp8: (e4m3 as uint8 [B,H,S,D], scale float32 [B,H,F,1]);
    nvfp4: (codes uint8 [B,H,S,D/2], block scales e4m3 as uint8 [B,H,S,D/16], frame scale float32 [B,H,F,1])."""
    b, h, s, d = x.shape
    frames = _frames(x, tokens_per_frame)
    if kv_format == "fp8":
        q, scale = FP8KVStorage.quantize(frames)
        return [q.view(torch.uint8).reshape(b, h, s, d), scale[..., None]]
    if kv_format == "nvfp4":
        q, g = NVFP4KVStorage.quantize(frames)
        return [q.data.reshape(b, h, s, d // 2), q.scale.view(torch.uint8).reshape(b, h, s, d // nvfp4.BLOCK),
                g[..., None]]
    raise ValueError(f"unknown quantized KV format {kv_format!r}; choose fp8 or nvfp4")


def dequantize_kv(fields: Sequence[torch.Tensor], kv_format: str, tokens_per_frame: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Wire fields of `quantize_kv` -> [B, H, S, D] in `dtype` (the decode of `longstream.quant.kv_storage`)."""
    if kv_format == "fp8":
        payload, scale = fields
        s = scale.repeat_interleave(tokens_per_frame, dim=2)
        return (payload.view(torch.float8_e4m3fn).float() * s).to(dtype)
    if kv_format == "nvfp4":
        codes, blocks, g = fields
        g = g.repeat_interleave(tokens_per_frame, dim=2)
        return nvfp4.dequantize(codes, blocks.view(torch.float8_e4m3fn), g, dtype=dtype)
    raise ValueError(f"unknown quantized KV format {kv_format!r}; choose fp8 or nvfp4")


def fake_quantize_kv(x: torch.Tensor, kv_format: str, tokens_per_frame: int) -> torch.Tensor:
    """What a receiver gets for K or V [B, H, S, D] in `kv_format` (identity for "dense")."""
    if kv_format == "dense":
        return x
    return dequantize_kv(quantize_kv(x, kv_format, tokens_per_frame), kv_format, tokens_per_frame, x.dtype)


def kv_token_bytes(kv_format: str, head_dim: int, elem_bytes: int) -> int:
    """Bytes per (token, head) of K or V on the wire, frame scales excluded."""
    if kv_format == "dense":
        return head_dim * elem_bytes
    if kv_format == "fp8":
        return head_dim
    if kv_format == "nvfp4":
        return head_dim // 2 + head_dim // nvfp4.BLOCK
    raise ValueError(f"unknown KV format {kv_format!r}; choose one of {', '.join(KV_FORMATS)}")


def attention_bytes_sent(
    seq_splits: Sequence[int], head_splits: Sequence[int], head_dim: int, rank: int, *, batch: int = 1,
    elem_bytes: int = 2, kv_format: str = "dense", tokens_per_frame: int = 1,
) -> dict[str, int]:
    """Bytes rank `rank` sends to other ranks in one `UlyssesAttention` call, by tensor (q, k, v, out)."""
    s_me, h_me = seq_splits[rank], head_splits[rank]
    h_other = sum(head_splits) - h_me
    s_other = sum(seq_splits) - s_me
    q = batch * s_me * h_other * head_dim * elem_bytes
    kv = batch * s_me * h_other * kv_token_bytes(kv_format, head_dim, elem_bytes)
    if kv_format != "dense":
        kv += batch * (s_me // tokens_per_frame) * h_other * 4
    out = batch * s_other * h_me * head_dim * elem_bytes
    return {"q": q, "k": kv, "v": kv, "out": out}


# -- attention ------------------------------------------------------------------------------------------------------
def _default_inner(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    return attention(q, k, v, mask)


class UlyssesAttention:
    """A `self_attention` function on sequence shards around an attention on head shards.

    Call: (layer, q, k, v, mask) with q, k, v [B, H, S_r, D] -> output [B, H, S_r, D]. Inside: one all-to-all
    sends q, k, v (k, v optionally quantized) to head shards [B, H_r, S, D] in exchange order,
    `inner(layer, q, k, v, mask)` attends, a second all-to-all returns the output to sequence shards.

    `mask`: the mask for `inner`, in exchange order (e.g. `BalancedLayout.token_mask`; the trainer passes
    none and an `inner` that applies the frame mask by groups, `FrameMaskAttention`). The model builds its mask
    from the local shard only, so with a global mask run the model with causal=False (it then passes mask=None);
    a call that passes a mask as well is refused. Without a global mask a per-call mask goes to `inner` as is.
    `seq_splits`: the token counts of the ranks (an attribute: set it per chunk). Also usable as the `cache` of
    `forward_stream` via `attend` (see `cache_attention`). `stats` counts the bytes this rank sends (forward)."""

    def __init__(
        self,
        group: "dist.ProcessGroup | None",
        seq_splits: Sequence[int],
        inner: MaskedAttention | None = None,
        *,
        mask: torch.Tensor | None = None,
        kv_format: str = "dense",
        tokens_per_frame: int | None = None,
        stats: ExchangeStats | None = None,
        fields_inner: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if kv_format not in KV_FORMATS:
            raise ValueError(f"unknown KV format {kv_format!r}; choose one of {', '.join(KV_FORMATS)}")
        if kv_format != "dense" and not tokens_per_frame:
            raise ValueError(f"kv_format={kv_format!r} needs tokens_per_frame (scales are per latent frame)")
        self.group = group
        self.seq_splits = _check_seq(group, seq_splits)
        self.inner = inner or _default_inner
        self.mask = mask
        self.kv_format = kv_format
        self.tokens_per_frame = tokens_per_frame or 1
        self.stats = stats if stats is not None else ExchangeStats()
        self.fields_inner = fields_inner

    @property
    def world(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def head_splits(self, heads: int) -> list[int]:
        return even_splits(heads, self.world)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.mask is not None:
            if mask is not None:
                raise ValueError("got a mask per call and one at construction; with a global mask run the model "
                                 "with causal=False (the model's mask covers only the local shard)")
            mask = self.mask
        heads = self.head_splits(q.shape[1])
        seq = self.seq_splits
        if q.shape[2] != seq[self.rank]:
            raise ValueError(f"rank {self.rank} holds {q.shape[2]} tokens but seq_splits says {seq[self.rank]}")
        if self.kv_format == "dense":
            qh, kh, vh = exchange([q, k, v], self.group, 1, 2, [heads] * 3, [seq] * 3,
                                  names=["q", "k", "v"], stats=self.stats)
            out = self.inner(layer, qh, kh, vh, mask)
        else:
            qh, kf, vf = self._exchange_quantized(q, k, v, heads)
            if self.fields_inner is not None:  # e.g. a quantized cache that stores the fields as they come
                out = self.fields_inner(layer, qh, kf, vf, mask)
            else:
                t = self.tokens_per_frame
                kh = dequantize_kv(kf, self.kv_format, t, q.dtype)
                vh = dequantize_kv(vf, self.kv_format, t, q.dtype)
                out = self.inner(layer, qh, kh, vh, mask)
        return exchange([out.to(q.dtype)], self.group, 2, 1, [seq], [heads], names=["out"], stats=self.stats)[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The `KVCache.attend` signature, so that this object can stand in for the cache in `forward_stream`."""
        return self(layer, q, k, v, None)

    def _exchange_quantized(self, q, k, v, heads):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("the quantized K/V exchange is for inference; run it under torch.no_grad()")
        t = self.tokens_per_frame
        if any(s % t for s in self.seq_splits):
            raise ValueError(f"quantized K/V exchange needs whole frames of {t} tokens per rank, got "
                             f"{self.seq_splits}")
        frames = [s // t for s in self.seq_splits]
        kf, vf = quantize_kv(k, self.kv_format, t), quantize_kv(v, self.kv_format, t)
        n = len(kf)
        fields = [q, *kf, *vf]
        recv = [self.seq_splits] + ([self.seq_splits] * (n - 1) + [frames]) * 2
        names = ["q"] + ["k"] * n + ["v"] * n
        got = exchange(fields, self.group, 1, 2, [heads] * len(fields), recv, names=names, stats=self.stats)
        return got[0], got[1: 1 + n], got[1 + n:]


def cache_attention(cache, group: "dist.ProcessGroup | None", seq_splits: Sequence[int], **kwargs) -> UlyssesAttention:
    """Sequence-parallel attention over a `KVCache` that holds this rank's heads (built with heads=H_r):
    pass the result as the `cache` argument of `forward_stream` (which only calls `.attend`); slot bookkeeping
    (`begin_chunk`, `commit`) stays on the cache itself, identical on every rank."""
    return UlyssesAttention(group, seq_splits, lambda layer, q, k, v, mask: cache.attend(layer, q, k, v), **kwargs)
