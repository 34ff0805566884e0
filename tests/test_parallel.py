"""Sequence parallelism: process mesh, Ulysses exchanges (dense, FP8, NVFP4 K/V), Balanced SP layout.

Multi-process checks run in spawned gloo processes (tests/_dist_workers.py), one launch per world size (2 and 4
ranks), each running every check in order; a test per (world, check) reports its outcome. Everything else runs
in this process.
"""

from __future__ import annotations

import pytest
import torch

import _dist_workers as workers
from longstream.model.attention import attention, expand_frame_mask, teacher_forcing_mask
from longstream.model.kv_cache import DenseKVStorage
from longstream.parallel import (
    BalancedLayout,
    NaiveLayout,
    ParallelContext,
    ParallelError,
    UlyssesAttention,
    attention_bytes_sent,
    even_splits,
    exchange_order,
    expand_frame_order,
    fake_quantize_kv,
    heads_to_seq,
    make_layout,
    seq_to_heads,
)
from longstream.quant.kv_storage import FP8KVStorage, NVFP4KVStorage

CHECKS = list(workers.CHECKS)


# -- multi-process ------------------------------------------------------------------------------------------------
def _launch(world: int, tmp_path_factory) -> tuple[str | None, set[str]]:
    out = tmp_path_factory.mktemp(f"world{world}")
    error = workers.launch(world, CHECKS, str(out))
    return error, workers.completed(str(out), world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(2, tmp_path_factory)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _launch(4, tmp_path_factory)


def _outcome(result: tuple[str | None, set[str]], check: str) -> None:
    error, done = result
    if check not in done:
        pytest.fail(f"{check} did not pass; the run stopped with:\n{error}")


@pytest.mark.parametrize("check", CHECKS)
def test_two_ranks(two_ranks, check):
    _outcome(two_ranks, check)


@pytest.mark.parametrize("check", CHECKS)
def test_four_ranks(four_ranks, check):
    _outcome(four_ranks, check)


# -- Balanced SP layout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,chunk", [(4, 1), (8, 2), (12, 3), (12, 5), (16, 4)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_balanced_mask_is_the_permuted_standard_mask(frames, chunk, world):
    layout = BalancedLayout(frames, chunk, world)
    perm = layout.permutation()
    assert sorted(perm.tolist()) == list(range(2 * frames))
    standard = teacher_forcing_mask(frames, chunk)
    assert torch.equal(layout.frame_mask(), standard[perm][:, perm])
    # exchange order is [rank0 clean, rank0 noisy, rank1 clean, ...] and the decode says so
    rank, noisy, frame = layout.decode(torch.arange(2 * frames))
    assert torch.equal(perm, torch.where(noisy, frame + frames, frame))
    slice_ = frames // world
    assert rank.tolist() == [i // (2 * slice_) for i in range(2 * frames)]
    # token level: the expanded mask follows the expanded permutation
    tok = expand_frame_order(perm, 3)
    assert torch.equal(layout.token_mask(3), expand_frame_mask(standard, 3)[tok][:, tok])
    assert torch.equal(tok, exchange_order([expand_frame_order(layout.local_frames(r), 3) for r in range(world)]))


def test_shard_and_unshard():
    layout = BalancedLayout(8, 2, 4)
    x = torch.arange(16).view(1, 16)
    shards = [layout.shard(x, r, 1) for r in range(4)]
    assert shards[1].tolist() == [[2, 3, 10, 11]]  # clean frames 2, 3 then noisy frames 2, 3
    assert torch.equal(layout.unshard(shards, 1), x)
    assert layout.seq_splits(880) == [4 * 880] * 4


def test_balance_counts():
    t = 10
    naive = NaiveLayout(16, 4, 4).counts(t)
    balanced = BalancedLayout(16, 4, 4).counts(t)
    total_pairs = int(teacher_forcing_mask(16, 4).sum()) * t * t
    for counts in (naive, balanced):
        assert [c.tokens for c in counts] == [8 * t] * 4
        assert sum(c.query_pairs for c in counts) == total_pairs
    assert [c.loss_tokens for c in naive] == [0, 0, 8 * t, 8 * t]  # rank 0 (and 1) hold no loss
    assert [c.loss_tokens for c in balanced] == [4 * t] * 4
    assert [c.latent_frames for c in naive] == [8, 8, 8, 8]  # every clean latent is needed twice
    assert [c.latent_frames for c in balanced] == [4] * 4  # VAE encoding is split P ways
    # per-query attention work: clean [0..3] frames see 4..16 frames, so later slices carry more
    assert [c.query_pairs for c in balanced] == sorted(c.query_pairs for c in balanced)
    assert make_layout("balanced", 16, 4, 4) == BalancedLayout(16, 4, 4)


def test_layout_errors():
    with pytest.raises(ParallelError, match="divisible by the SP size"):
        BalancedLayout(10, 2, 4)
    with pytest.raises(ParallelError, match="naive SP"):
        NaiveLayout(3, 1, 4)
    with pytest.raises(ParallelError, match="unknown SP layout"):
        make_layout("ring", 8, 2, 2)
    with pytest.raises(ParallelError, match="rank 4"):
        BalancedLayout(8, 2, 4).local_frames(4)


# -- process mesh ---------------------------------------------------------------------------------------------------
def test_single_process_context():
    ctx = ParallelContext.from_env(env={})
    assert (ctx.world_size, ctx.sp_size, ctx.dp_size, ctx.sp_rank) == (1, 1, 1, 0)
    assert ctx.sp_group is None and ctx.dp_group is None and not ctx.distributed
    with pytest.raises(ParallelError, match="torchrun"):
        ParallelContext.from_env(2, env={})


def test_context_errors():
    env = dict(RANK="0", WORLD_SIZE="6", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    with pytest.raises(ParallelError, match="world size 6 is not divisible by sp_size 4"):
        ParallelContext.from_env(4, env=env, device="cpu")
    with pytest.raises(ParallelError, match="MASTER_PORT"):
        ParallelContext.from_env(2, env={k: v for k, v in env.items() if k != "MASTER_PORT"}, device="cpu")
    with pytest.raises(ParallelError, match="not an integer"):
        ParallelContext.from_env(2, env={**env, "RANK": "x"}, device="cpu")


# -- Ulysses, one process -------------------------------------------------------------------------------------------
def test_splits_and_identities():
    assert even_splits(5, 2) == [3, 2] and even_splits(24, 8) == [3] * 8 and even_splits(3, 4) == [1, 1, 1, 0]
    x = torch.randn(2, 3, 7, 4)
    assert seq_to_heads(x, None, [7]) is x and heads_to_seq(x, None, [7]) is x
    with pytest.raises(ValueError, match="entries"):
        seq_to_heads(x, None, [3, 4])
    with pytest.raises(ValueError, match="tokens_per_frame"):
        UlyssesAttention(None, [7], kv_format="fp8")
    with pytest.raises(ValueError, match="unknown KV format"):
        UlyssesAttention(None, [7], kv_format="int4")


@pytest.mark.parametrize("fmt,storage", [("fp8", FP8KVStorage), ("nvfp4", NVFP4KVStorage), ("dense", DenseKVStorage)])
def test_wire_format_is_the_cache_format(fmt, storage):
    """What a receiver dequantizes equals what the quantized KV cache returns for the same frames."""
    b, h, f, t, d = 2, 3, 4, 5, 32
    k, v = torch.randn(b, h, f * t, d) * 3, torch.randn(b, h, f * t, d)
    cache = storage(b, h, f * t, d, torch.float32, "cpu", tokens_per_frame=t)
    cache.write(torch.arange(f * t), k, v)
    ck, cv = cache.read(f * t)
    assert torch.equal(fake_quantize_kv(k, fmt, t), ck) and torch.equal(fake_quantize_kv(v, fmt, t), cv)


def test_single_process_attention_and_fake_quantization():
    q, k, v = (torch.randn(1, 3, 12, 16) for _ in range(3))
    mask = torch.rand(12, 12) < 0.5
    mask |= torch.eye(12, dtype=torch.bool)
    assert torch.equal(UlyssesAttention(None, [12], mask=mask)(0, q, k, v), attention(q, k, v, mask))
    sp = UlyssesAttention(None, [12], kv_format="nvfp4", tokens_per_frame=4)
    with torch.no_grad():
        got = sp(0, q, k, v, mask)
    assert torch.equal(got, attention(q, fake_quantize_kv(k, "nvfp4", 4), fake_quantize_kv(v, "nvfp4", 4), mask))
    assert sp.stats.total() == 0
    with pytest.raises(ValueError, match="causal=False"):
        UlyssesAttention(None, [12], mask=mask)(0, q, k, v, mask)
    with pytest.raises(RuntimeError, match="no_grad"):
        sp(0, q.requires_grad_(True), k, v)


def test_bytes_formula():
    # 5B preset, one chunk of 8 frames x 880 tokens, SP = 4: 2 frames per rank, 6 heads per rank
    t, seq, heads = 880, [1760] * 4, [6] * 4
    dense = attention_bytes_sent(seq, heads, 128, 0)
    assert dense == {k: 1760 * 18 * 128 * 2 for k in ("q", "k", "v", "out")}
    nv = attention_bytes_sent(seq, heads, 128, 0, kv_format="nvfp4", tokens_per_frame=t)
    assert nv["k"] == 1760 * 18 * 72 + 2 * 18 * 4  # 72 bytes per token-head + one float32 per frame-head
    fp8 = attention_bytes_sent(seq, heads, 128, 0, kv_format="fp8", tokens_per_frame=t)
    assert fp8["v"] == 1760 * 18 * 128 + 2 * 18 * 4


def test_quantized_exchange_hands_fields_to_a_fields_consumer():
    """With `fields_inner` the receiver gets the wire fields (no dequantize): what a same-format cache stores."""
    from longstream.parallel.ulysses import dequantize_kv, quantize_kv

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    seen = {}

    def consume(layer, qh, kf, vf, mask):
        seen["k"], seen["v"] = kf, vf
        return attention(qh, dequantize_kv(kf, "nvfp4", 4, qh.dtype), dequantize_kv(vf, "nvfp4", 4, qh.dtype), mask)

    sp = UlyssesAttention(None, [8], kv_format="nvfp4", tokens_per_frame=4, fields_inner=consume)
    with torch.no_grad():
        out = sp(0, q, k, v)
    want = quantize_kv(k, "nvfp4", 4)
    assert all(torch.equal(a, b) for a, b in zip(seen["k"], want))
    assert torch.equal(out, UlyssesAttention(None, [8], kv_format="nvfp4", tokens_per_frame=4)(0, q, k, v))
