"""Checks run inside spawned gloo processes by tests/test_parallel.py.

`launch(world, checks, out_dir)` starts `world` processes with torch.multiprocessing.spawn, each with the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set, builds a `ParallelContext` and runs the
named checks in order; after each check a rank appends the check's name to out_dir/rank{r}.txt. The first failure
stops every process and is returned as text. Every rank builds the same global tensors from fixed seeds, so each
can compute the single-process reference itself.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longstream.config import TransformerConfig
from longstream.model.attention import attention, expand_frame_mask, teacher_forcing_mask
from longstream.model.kv_cache import KVCache
from longstream.model.transformer import CausalWanTransformer
from longstream.parallel import (
    BalancedLayout,
    ParallelContext,
    UlyssesAttention,
    attention_bytes_sent,
    cache_attention,
    even_splits,
    exchange,
    fake_quantize_kv,
    gather_seq,
    heads_to_seq,
    seq_to_heads,
)

TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, checks: list[str], out_dir: str) -> str | None:
    """Run `checks` on `world` processes; None on success, else the failure text."""
    try:
        mp.spawn(_entry, args=(world, free_port(), checks, out_dir), nprocs=world, join=True)
    except Exception as exc:  # ProcessRaisedException carries the child's traceback
        return f"{type(exc).__name__}: {exc}"
    return None


def completed(out_dir: str, world: int) -> set[str]:
    """Checks that finished on every rank."""
    done = None
    for r in range(world):
        path = Path(out_dir) / f"rank{r}.txt"
        names = set(path.read_text().split()) if path.exists() else set()
        done = names if done is None else done & names
    return done or set()


def _entry(rank: int, world: int, port: int, checks: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = ParallelContext.from_env(timeout_s=TIMEOUT_S, device="cpu")
    try:
        for name in checks:
            try:
                CHECKS[name](ctx)
            except Exception:
                raise AssertionError(f"check {name!r} failed on rank {rank}:\n{traceback.format_exc()}") from None
            with open(Path(out_dir) / f"rank{rank}.txt", "a") as f:
                f.write(name + "\n")
    finally:
        ctx.close()


# -- helpers --------------------------------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def offsets(splits: list[int]) -> list[int]:
    out = [0]
    for s in splits:
        out.append(out[-1] + s)
    return out


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def random_mask(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)


def local(x: torch.Tensor, splits: list[int], rank: int, dim: int = 2) -> torch.Tensor:
    o = offsets(splits)
    return x.narrow(dim, o[rank], splits[rank])


# -- checks ---------------------------------------------------------------------------------------------------------
def check_mesh(ctx: ParallelContext) -> None:
    w = dist.get_world_size()
    assert (ctx.world_size, ctx.sp_size, ctx.dp_size) == (w, w, 1)
    assert ctx.sp_rank == ctx.rank and ctx.dp_rank == 0 and ctx.sp_ranks() == list(range(w))
    assert dist.get_world_size(ctx.sp_group) == w and dist.get_world_size(ctx.dp_group) == 1
    if w % 2 == 0:  # a (dp, sp) = (w/2, 2) mesh on the same process group: rank = dp_rank * 2 + sp_rank
        sub = ParallelContext.from_env(sp_size=2, device="cpu")
        assert not sub.owns_process_group
        assert (sub.dp_size, sub.sp_size) == (w // 2, 2)
        assert (sub.dp_rank, sub.sp_rank) == (ctx.rank // 2, ctx.rank % 2)
        assert sub.sp_ranks() == [ctx.rank // 2 * 2, ctx.rank // 2 * 2 + 1]
        # each SP group exchanges its own data
        x = randn(2, 3, 8, 4, seed=100 + sub.dp_rank)
        y = seq_to_heads(local(x, [5, 3], sub.sp_rank), sub.sp_group, [5, 3])
        assert torch.equal(y, x[:, [0, 1]] if sub.sp_rank == 0 else x[:, [2]])


def _roundtrip_cases(world: int) -> list[tuple[int, list[int], torch.dtype]]:
    if world == 2:
        return [(4, [4, 4], torch.float32), (5, [3, 5], torch.float32), (5, [3, 5], torch.bfloat16),
                (3, [0, 6], torch.float32)]
    return [(4, [2, 2, 2, 2], torch.float32), (5, [3, 0, 5, 2], torch.float32), (5, [3, 1, 5, 2], torch.bfloat16),
            (6, [1, 2, 3, 4], torch.float16)]


def check_roundtrip(ctx: ParallelContext) -> None:
    g, r, p = ctx.sp_group, ctx.sp_rank, ctx.sp_size
    for i, (heads, splits, dtype) in enumerate(_roundtrip_cases(p)):
        x = randn(2, heads, sum(splits), 6, seed=i, dtype=dtype)
        mine = local(x, splits, r)
        hs = even_splits(heads, p)
        y = seq_to_heads(mine, g, splits)
        assert y.shape == (2, hs[r], sum(splits), 6) and y.dtype == dtype
        assert torch.equal(y, local(x, hs, r, dim=1)), (heads, splits, dtype)
        back = heads_to_seq(y, g, splits, num_heads=heads)
        assert torch.equal(back, mine), (heads, splits, dtype)
    # several fields of different dtypes and gather sizes in one collective (e.g. payload + per-frame scales)
    t = 3
    frames = [2, 1] if p == 2 else [2, 1, 0, 1]
    tokens = [f * t for f in frames]
    payload = torch.randint(0, 256, (1, 5, sum(tokens), 9), generator=torch.Generator().manual_seed(7),
                            dtype=torch.uint8)
    scale = randn(1, 5, sum(frames), 1, seed=8)
    hs = even_splits(5, p)
    a, b = exchange([local(payload, tokens, r), local(scale, frames, r)], g, 1, 2, [hs, hs], [tokens, frames])
    assert torch.equal(a, local(payload, hs, r, dim=1)) and torch.equal(b, local(scale, hs, r, dim=1))
    # gather of uneven shards
    z = randn(1, 2, sum(tokens), 3, seed=9)
    assert torch.equal(gather_seq(local(z, tokens, r), g, tokens, dim=2), z)


def check_autograd_exchange(ctx: ParallelContext) -> None:
    g, r, p = ctx.sp_group, ctx.sp_rank, ctx.sp_size
    splits = [3, 5] if p == 2 else [3, 1, 5, 2]
    heads = 5
    x = randn(2, heads, sum(splits), 4, seed=20)
    w = randn(2, heads, sum(splits), 4, seed=21)
    mine = local(x, splits, r).clone().requires_grad_(True)
    y = seq_to_heads(mine, g, splits)
    (y * local(w, even_splits(heads, p), r, dim=1)).sum().backward()
    assert torch.equal(mine.grad, local(w, splits, r))
    # and back: heads_to_seq's gradient is seq_to_heads
    hs = even_splits(heads, p)
    mine_h = local(x, hs, r, dim=1).clone().requires_grad_(True)
    s = heads_to_seq(mine_h, g, splits, num_heads=heads)
    (s * local(w, splits, r)).sum().backward()
    assert torch.equal(mine_h.grad, local(w, hs, r, dim=1))


def _attention_case(p: int) -> tuple[int, list[int]]:
    return (5, [4, 7]) if p == 2 else (5, [3, 1, 5, 2])


def check_attention(ctx: ParallelContext) -> None:
    """UlyssesAttention with a masked inner attention == one-process attention, forward and gradients."""
    g, r, p = ctx.sp_group, ctx.sp_rank, ctx.sp_size
    heads, splits = _attention_case(p)
    n = sum(splits)
    q, k, v, gout = (randn(2, heads, n, 8, seed=30 + i) for i in range(4))
    mask = random_mask(n, 34)
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = attention(*ref, mask)
    (expected * gout).sum().backward()

    mine = [local(t, splits, r).clone().requires_grad_(True) for t in (q, k, v)]
    calls = []

    def inner(layer, qh, kh, vh, m):
        calls.append((layer, qh.shape, m.shape))
        return attention(qh, kh, vh, m)

    sp = UlyssesAttention(g, splits, inner, mask=mask)
    out = sp(7, *mine)
    assert calls == [(7, torch.Size((2, even_splits(heads, p)[r], n, 8)), torch.Size((n, n)))]
    assert rel(out, local(expected, splits, r)) < 1e-5
    (out * local(gout, splits, r)).sum().backward()
    for a, b in zip(mine, ref):
        assert rel(a.grad, local(b.grad, splits, r)) < 1e-5
    dense = attention_bytes_sent(splits, even_splits(heads, p), 8, r, batch=2, elem_bytes=4)
    assert sp.stats.bytes_sent == dense and sp.stats.calls == 2, (sp.stats, dense)


def check_quantized(ctx: ParallelContext) -> None:
    """FP8 / NVFP4 K/V exchange == one process attending over fake-quantized K, V (per frame and head)."""
    g, r, p = ctx.sp_group, ctx.sp_rank, ctx.sp_size
    t = 3
    frames = [2, 1] if p == 2 else [2, 1, 1, 0]
    splits = [f * t for f in frames]
    heads, n, d = 3 if p == 2 else 5, sum(splits), 32
    q, k, v = (randn(1, heads, n, d, seed=40 + i) * (1 + i) for i in range(3))
    mask = random_mask(n, 44)
    for fmt in ("fp8", "nvfp4"):
        expected = attention(q, fake_quantize_kv(k, fmt, t), fake_quantize_kv(v, fmt, t), mask)
        sp = UlyssesAttention(g, splits, mask=mask, kv_format=fmt, tokens_per_frame=t)
        with torch.no_grad():
            out = sp(0, *(local(x, splits, r) for x in (q, k, v)))
        assert rel(out, local(expected, splits, r)) < 1e-5, fmt
        # quantization is visible: the dense result differs
        assert rel(attention(q, k, v, mask), expected) > 1e-4
        want = attention_bytes_sent(splits, even_splits(heads, p), d, r, elem_bytes=4, kv_format=fmt,
                                    tokens_per_frame=t)
        assert sp.stats.bytes_sent == want, (fmt, sp.stats.bytes_sent, want)


def tiny_model(heads: int = 3, seed: int = 0, head_dim: int = 8) -> CausalWanTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=2, ffn_dim=32,
                            in_channels=4, out_channels=4, text_dim=8, freq_dim=16)
    model = CausalWanTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def check_balanced_model(ctx: ParallelContext) -> None:
    """Balanced SP teacher forcing through the whole model: each rank runs its [clean slice, noisy slice] frames
    with causal=False and UlyssesAttention holding the balanced mask; outputs and summed parameter gradients equal
    the one-process masked forward (standard order, teacher_forcing_mask)."""
    g, r, p = ctx.sp_group, ctx.sp_rank, ctx.sp_size
    f, chunk, hw = 4, 2, (4, 4)
    tpf = (hw[0] // 2) * (hw[1] // 2)
    layout = BalancedLayout(f, chunk, p)
    model = tiny_model()
    seq = randn(1, 4, 2 * f, *hw, seed=50)  # [clean 0..F-1, noisy 0..F-1]
    target = randn(1, 4, 2 * f, *hw, seed=51)
    t = torch.cat([torch.zeros(1, f), torch.rand(1, f, generator=torch.Generator().manual_seed(52)) * 1000], 1)
    positions = torch.arange(f).repeat(2)
    text = randn(1, 5, 8, seed=53)
    noisy = (torch.arange(2 * f) >= f).float().view(1, 1, -1, 1, 1)
    count = noisy.sum() * 4 * hw[0] * hw[1]

    pred = model(seq, t, text, causal=True, frame_positions=positions, frame_mask=teacher_forcing_mask(f, chunk))
    (((pred - target) ** 2) * noisy).sum().div(count).backward()
    ref_grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()

    sp = UlyssesAttention(g, layout.seq_splits(tpf), mask=layout.token_mask(tpf))
    mine = model(layout.shard(seq, r, 2), layout.shard(t, r, 1), text, causal=False,
                 frame_positions=layout.shard(positions, r, 0), self_attention=sp)
    assert rel(mine, layout.shard(pred, r, 2)) < 1e-5
    diff = (mine - layout.shard(target, r, 2)) ** 2
    (diff * layout.shard(noisy, r, 2)).sum().div(count).backward()
    for name, q in model.named_parameters():
        dist.all_reduce(q.grad, group=g)
        assert rel(q.grad, ref_grads[name]) < 1e-5, name
    # the balanced mask equals the standard one permuted
    perm = layout.permutation()
    assert torch.equal(layout.frame_mask(), teacher_forcing_mask(f, chunk)[perm][:, perm])
    assert torch.equal(layout.token_mask(tpf), expand_frame_mask(teacher_forcing_mask(f, chunk), tpf)[
        _tokens(perm, tpf)][:, _tokens(perm, tpf)])


def _tokens(frame_perm: torch.Tensor, tpf: int) -> torch.Tensor:
    return (frame_perm[:, None] * tpf + torch.arange(tpf)).reshape(-1)


def check_streaming(ctx: ParallelContext) -> None:
    """SP streaming: each rank runs its frames of a chunk through forward_stream with a KV cache of its heads;
    equals the one-process stream (3 chunks, ring eviction included)."""
    g, r, p = ctx.sp_group, ctx.sp_rank, ctx.sp_size
    model = tiny_model().eval()
    heads, hw, chunk = 3, (4, 4), p
    tpf = 4
    hs = even_splits(heads, p)

    def cache(h: int) -> KVCache:
        return KVCache(num_layers=2, batch=1, heads=h, head_dim=8, tokens_per_frame=tpf, latent_shape=(4, *hw),
                       sink_frames=1, window_frames=chunk + 2)

    full, part = cache(heads), cache(hs[r])
    text = model.prepare_text(randn(1, 5, 8, seed=60))
    frame_splits = [1] * p
    with torch.no_grad():
        for c in range(3):
            frames = list(range(c * chunk, (c + 1) * chunk))
            for kv in (full, part):
                kv.begin_chunk(frames, [f_ < 1 for f_ in frames], [float(f_) for f_ in frames], c)
            pos = torch.tensor(frames, dtype=torch.float64)
            x = randn(1, 4, chunk, *hw, seed=61 + c)
            tt = torch.full((1,), 500.0)
            want = model.forward_stream(x, tt, text, full, pos)
            sp = cache_attention(part, g, [tpf] * p)
            got = model.forward_stream(local(x, frame_splits, r), tt, text, sp, local(pos, frame_splits, r, 0))
            assert rel(got, local(want, frame_splits, r)) < 1e-5, c
            assert rel(gather_seq(got, g, frame_splits, dim=2), want) < 1e-5
            clean = randn(1, 4, chunk, *hw, seed=70 + c)
            zero = torch.zeros(1)
            model.forward_stream(clean, zero, text, full, pos, need_output=False)
            model.forward_stream(local(clean, frame_splits, r), zero, text, sp, local(pos, frame_splits, r, 0),
                                 need_output=False)
            full.commit(clean)
            part.commit(clean)


def _generator_run(ctx: ParallelContext | None, kv: str) -> torch.Tensor:
    """Latents of a 3-chunk, 2-shot stream (uneven: 3 heads, chunk of P + 1 frames), SP when ctx is given."""
    from longstream.config import StreamConfig
    from longstream.parallel.stream_sp import StreamShard
    from longstream.pipeline.stream import ShotPlan, StreamingGenerator

    p = ctx.sp_size if ctx is not None else int(os.environ["WORLD_SIZE"])
    chunk = p + 1
    stream = StreamConfig(chunk_frames=chunk, window_frames=chunk + 3, sink_frames=1, steps=2,
                          shot_rope_offset=1.5)
    shard = StreamShard(ctx.sp_group, kv_format=kv if kv != "dense" else "dense") if ctx is not None else None
    head_dim = 16 if kv == "nvfp4" else 8  # NVFP4 blocks are 16 wide
    gen = StreamingGenerator(tiny_model(head_dim=head_dim).eval(), stream, (4, 4), kv_storage=kv, shard=shard)
    shots = [ShotPlan(randn(1, 5, 8, seed=80), 2), ShotPlan(randn(1, 4, 8, seed=81), 1)]
    with torch.no_grad():
        chunks = gen.generate(shots, generator=torch.Generator().manual_seed(9))
        return torch.cat([c.latents for c in chunks], dim=2)


def check_generator_dense(ctx: ParallelContext) -> None:
    """StreamingGenerator with SP (re-cache, eviction, uneven heads and frames) equals one process."""
    assert rel(_generator_run(ctx, "dense"), _generator_run(None, "dense")) < 1e-5


def check_generator_fp8(ctx: ParallelContext) -> None:
    """FP8 K/V through the all-to-all into an FP8 cache equals one process with the same FP8 cache."""
    assert rel(_generator_run(ctx, "fp8"), _generator_run(None, "fp8")) < 1e-5


def check_generator_nvfp4(ctx: ParallelContext) -> None:
    """NVFP4 K/V through the all-to-all, stored as they arrive in an NVFP4 cache, equals one process with the same
    NVFP4 cache (re-quantizing what arrives would re-round the block scales and drift)."""
    assert rel(_generator_run(ctx, "nvfp4"), _generator_run(None, "nvfp4")) < 1e-5


CHECKS: dict[str, Callable[[ParallelContext], None]] = {
    "mesh": check_mesh,
    "roundtrip": check_roundtrip,
    "autograd_exchange": check_autograd_exchange,
    "attention": check_attention,
    "quantized": check_quantized,
    "balanced_model": check_balanced_model,
    "streaming": check_streaming,
    "generator_dense": check_generator_dense,
    "generator_fp8": check_generator_fp8,
    "generator_nvfp4": check_generator_nvfp4,
}
