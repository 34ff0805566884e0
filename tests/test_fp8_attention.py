"""FP8 attention over an FP8 KV cache: the reference's math against an independent one-tile formula and exact
float64 attention; the Triton kernel (interpreted on CPU, compiled on a GPU) against the reference; the cache
and generator paths that use it."""

import importlib.util
import math

import pytest
import torch

from _interpreted import run_interpreted
from longstream.model.attention import attention
from longstream.model.kv_cache import KVCache
from longstream.quant.fp8_attention import P_SCALE, fp8_attention_reference
from longstream.quant.kv_storage import FP8KVStorage


def filled_storage(b, h, frames, t, d, seed, k_scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    store = FP8KVStorage(b, h, frames * t, d, torch.float32, device, tokens_per_frame=t)
    per_frame = torch.logspace(-0.5, 0.5, frames).repeat_interleave(t)[:, None]  # frame scales differ
    k = torch.randn(b, h, frames * t, d, generator=g) * k_scale * per_frame
    v = torch.randn(b, h, frames * t, d, generator=g) / per_frame
    store.write(torch.arange(frames * t, device=device), k.to(device), v.to(device))
    return store, g


def test_one_tile_reference_is_the_documented_formula():
    """With one key tile the reference is: E4M3 queries (row scales), scores, p = exp(S - max), p * v_scale /
    v_ref * 256 in E4M3, (p8 V8) * v_ref / 256 / sum p. Written out here without the online softmax."""
    store, g = filled_storage(1, 2, 3, 10, 32, seed=0)
    q = torch.randn(1, 2, 7, 32, generator=g)
    got = fp8_attention_reference(q, store.k, store.k_scale, store.v, store.v_scale, 30, 10, block_n=64)
    e4m3 = lambda x: x.clamp(-448, 448).to(torch.float8_e4m3fn).float()  # noqa: E731
    q_scale = q.abs().amax(-1, keepdim=True) / 448
    ks = store.k_scale.repeat_interleave(10, 2)
    vs = store.v_scale.repeat_interleave(10, 2)
    s = e4m3(q / q_scale) @ store.k.float().transpose(-1, -2) * q_scale * ks[:, :, None] / math.sqrt(32)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    v_ref = vs.amax(-1)[..., None, None]
    values = store.v.float().transpose(-1, -2)  # the cache keeps them [B, H, D, S]
    want = e4m3(p * vs[:, :, None] / v_ref * P_SCALE) @ values * v_ref / P_SCALE / p.sum(-1, keepdim=True)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("logit_scale,bound", [(1.0, 0.06), (2.0, 0.1)])
def test_reference_error_against_exact_attention_is_fp8_sized(logit_scale, bound):
    """Relative error (Frobenius) against float64 attention over the same cached K/V: the E4M3 rounding of queries
    and probabilities (measured 4.5% and 8.2%, nearly all from the queries; bf16 attention is ~10x closer)."""
    store, g = filled_storage(1, 4, 6, 64, 128, seed=1, k_scale=logit_scale)
    q = torch.randn(1, 4, 128, 128, generator=g) * logit_scale
    got = fp8_attention_reference(q, store.k, store.k_scale, store.v, store.v_scale, 384, 64)
    k, v = store.read(384)
    exact = attention(q.double(), k.double(), v.double())
    bf16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).double()
    err = float((got.double() - exact).norm() / exact.norm())
    assert float((bf16 - exact).norm() / exact.norm()) < err < bound


def test_visible_slots_hide_their_keys():
    store, g = filled_storage(1, 2, 4, 16, 32, seed=2)
    q = torch.randn(1, 2, 20, 32, generator=g)
    visible = torch.tensor([True, False, True, False])
    got = fp8_attention_reference(q, store.k, store.k_scale, store.v, store.v_scale, 64, 16, visible, block_n=16)
    kept = FP8KVStorage(1, 2, 32, 32, torch.float32, "cpu", tokens_per_frame=16)  # only the visible frames
    for name in ("k", "k_scale", "v_scale"):
        full = getattr(store, name)
        getattr(kept, name).copy_(full[:, :, [0, 2]] if name.endswith("scale") else
                                  torch.cat([full[:, :, :16], full[:, :, 32:48]], dim=2))
    kept.v.copy_(torch.cat([store.v[..., :16], store.v[..., 32:48]], dim=3))  # values: tokens last
    want = fp8_attention_reference(q, kept.k, kept.k_scale, kept.v, kept.v_scale, 32, 16, block_n=16)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


KERNEL = r'''
import torch
from longstream.quant.fp8_attention import fp8_attention_reference
from longstream.quant.kernels.fp8_attention import fp8_attention
from longstream.quant.kv_storage import FP8KVStorage

def check(b, h, sq, frames, t, d, length, visible, block_n, dtype, device, seed, strided=False, q_std=2.0,
          rows=False):
    """Kernel against the reference (same key tile): the relative error (Frobenius), or with `rows` the share of
    query rows whose own relative error passes 5%."""
    g = torch.Generator().manual_seed(seed)
    store = FP8KVStorage(b, h, frames * t, d, torch.float32, device, tokens_per_frame=t)
    per_frame = torch.logspace(-1, 1, frames).repeat_interleave(t)[:, None]
    k = torch.randn(b, h, frames * t, d, generator=g) * per_frame
    v = torch.randn(b, h, frames * t, d, generator=g) / per_frame
    store.write(torch.arange(frames * t, device=device), k.to(device), v.to(device))
    q = (torch.randn(b, h, sq, d, generator=g) * q_std).to(device, dtype)
    if strided:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    vis = None if visible is None else torch.tensor(visible, device=device)
    want = fp8_attention_reference(q.float(), store.k, store.k_scale, store.v, store.v_scale, length, t, vis,
                                   block_n).float()
    got = fp8_attention(q, store.k, store.k_scale, store.v, store.v_scale, length, t, vis)
    assert got.shape == q.shape and got.dtype == dtype
    assert got.transpose(1, 2).is_contiguous()  # [B, S, H, D] in memory
    if rows:
        per_row = (got.float() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
        return float((per_row > 0.05).float().mean())
    return float((got.float() - want).norm() / want.norm())
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fp8_attention_kernel_interpreted_equals_reference():
    """float32 queries: equal up to summation order. Shapes: a key tail shorter than a tile, head size 48 (not a
    power of two), queries not a multiple of the tile, a cache longer than `length`, hidden frame slots, full key
    tiles then a tail, and queries as the transformer passes them ([B, S, H, D] transposed)."""
    result = run_interpreted(KERNEL + (
        "print(check(2, 3, 70, 3, 21, 48, 63, None, 64, torch.float32, 'cpu', 0) < 1e-5);"
        "print(check(1, 2, 64, 5, 32, 32, 128, None, 64, torch.float32, 'cpu', 1) < 1e-5);"
        "print(check(1, 2, 50, 5, 20, 64, 100, [True, False, True, True, False], 64, torch.float32, 'cpu', 2) < 1e-5);"
        "print(check(1, 2, 40, 5, 20, 32, 100, None, 64, torch.float32, 'cpu', 3, strided=True) < 1e-5)"
    ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"] * 4


@pytest.mark.gpu
def test_fp8_attention_kernel_on_gpu_at_5b_shape():
    """bf16 queries and output, hardware E4M3 casts and FP8 tensor cores, against the reference with the GPU's
    128-key tile. FP8 tensor cores accumulate in reduced precision (Triton's Hopper default), so a near-tie of two
    logits may round the other way than the reference's float32 sums: the queries are kept moderately peaked
    (logits of std ~5, not ~20) so that a flipped tie moves a row a little, not to another key's value."""
    namespace = {}
    exec(KERNEL, namespace)
    from longstream.quant.kernels.fp8_attention import GPU_CONFIG

    check, block_n = namespace["check"], GPU_CONFIG["block_n"]
    assert check(1, 24, 7040, 32, 880, 128, 28160, None, block_n, torch.bfloat16, "cuda", 3, q_std=0.5) < 1e-2
    # and no systematic error hides in a share of rows: rows 5% off only where near-ties rounded the other way
    # (measured on an H200: 1.14% of the rows; a wrong scale or a lost key tile moves every row of a head)
    assert check(1, 24, 7040, 32, 880, 128, 28160, None, block_n, torch.bfloat16, "cuda", 3, q_std=0.5,
                 rows=True) < 3e-2
    assert check(1, 4, 100, 5, 64, 48, 300, [True, True, False, True, True], block_n, torch.bfloat16,
                 "cuda", 4, q_std=0.5) < 1e-2
    # hidden slots over full key tiles (head size 128: unmasked asynchronous loads, the key mask on the scores)
    assert check(1, 4, 300, 6, 100, 128, 560, [False, True, True, False, True, True], block_n, torch.bfloat16,
                 "cuda", 5, q_std=0.5) < 1e-2


def test_cache_with_fp8_attention_attends_from_the_codes_and_skips_empty_slots():
    """KVCache(attention='fp8') on a chunk placed in ring slots 1-2 with sink slot 0 still empty: close to exact
    attention over the same stored codes (the bf16 path's key mask), and blind to whatever finite codes the empty
    slot holds."""
    def cache(attention):
        return KVCache(num_layers=1, batch=1, heads=2, head_dim=32, tokens_per_frame=8, latent_shape=(4, 2, 4),
                       sink_frames=1, window_frames=4, storage="fp8", attention=attention)

    g = torch.Generator().manual_seed(5)
    fp8, plain = cache("fp8"), cache("bf16")
    for c in (fp8, plain):
        c.begin_chunk([5, 6], [False, False], [5.0, 6.0], chunk=0)  # not sink-eligible: ring slots 1 and 2
    q, k, v = (torch.randn(1, 2, 16, 32, generator=g) for _ in range(3))
    got = fp8.attend(0, q, k, v)
    exact = plain.attend(0, q, k, v)  # the same stored codes, dequantized, exact attention over slots 1-2
    assert 0 < float((got - exact).norm() / exact.norm()) < 0.06
    store = fp8.layers[0]
    store.k[:, :, :8] = (torch.randn(1, 2, 8, 32, generator=g) * 100).to(torch.float8_e4m3fn)  # the empty slot
    store.v[..., :8] = store.k[:, :, :8].transpose(-1, -2)
    store.k_scale[:, :, 0] = store.v_scale[:, :, 0] = 7.0
    assert torch.equal(fp8.attend(0, q, k, v), got)


def test_fp8_attention_needs_the_fp8_cache():
    with pytest.raises(ValueError, match="fp8 KV cache"):
        KVCache(num_layers=1, batch=1, heads=1, head_dim=16, tokens_per_frame=2, latent_shape=(4, 2, 2),
                sink_frames=1, window_frames=2, storage="dense", attention="fp8")


def test_generator_with_fp8_attention_stays_near_bf16_attention():
    """A tiny model streamed 4 chunks (window full, sink) over the fp8 cache: FP8 attention against SDPA over the same
    cache, latents within the FP8 rounding of queries and probabilities."""
    from longstream.config import get_preset
    from longstream.model.transformer import CausalWanTransformer
    from longstream.pipeline.stream import ShotPlan, StreamingGenerator

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = CausalWanTransformer(preset.transformer).eval()
    text = torch.randn(1, 8, preset.transformer.text_dim)
    latents = {}
    for mode in ("bf16", "fp8"):
        gen = StreamingGenerator(model, preset.stream, preset.latent_size(), kv_storage="fp8", attention=mode)
        chunks = gen.generate([ShotPlan(text, 4)], generator=torch.Generator().manual_seed(1))
        latents[mode] = torch.cat([c.latents for c in chunks], dim=2)
    err = float((latents["fp8"] - latents["bf16"]).norm() / latents["bf16"].norm())
    assert 0 < err < 5e-3, err  # measured 3.7e-4
