"""The KV dequantize kernels (NVFP4, FP8) against their reference twins, bit for bit; the fused NVFP4 KV
attention kernel against dequantize + SDPA.

On CPU the kernel runs in Triton's interpreter in a child process (TRITON_INTERPRET must be set before triton is
imported), with float32 output: the interpreter truncates float32 -> bf16 casts whatever rounding mode is asked,
while GPUs round to nearest even, so bf16 output is compared on a GPU (`gpu` mark) at the 5B model's cache size.
"""

import importlib.util

import pytest
import torch

from _interpreted import run_interpreted

CHECK = r'''
import torch
from longstream.quant.kv_storage import FP8KVStorage, NVFP4KVStorage
from longstream.quant.kernels.kv_dequant import fp8_kv_dequantize, nvfp4_kv_dequantize
from longstream.quant import nvfp4

def check(b, h, frames, t, d, length_frames, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    fp8 = FP8KVStorage(b, h, frames * t, d, dtype, device, tokens_per_frame=t)
    store = NVFP4KVStorage(b, h, frames * t, d, dtype, device, tokens_per_frame=t)
    scale = torch.logspace(-3, 3, frames, dtype=torch.float64).float().repeat_interleave(t)
    k = (torch.randn(b, h, frames * t, d, generator=g) * scale[None, None, :, None]).to(device)
    k[:, :, :t, :16] = 0  # a zero block
    v = torch.randn(b, h, frames * t, d, generator=g).to(device)
    store.write(torch.arange(frames * t, device=device), k, v)
    fp8.write(torch.arange(frames * t, device=device), k, v)
    length = length_frames * t
    for codes, gs, last in ((fp8.k, fp8.k_scale, False), (fp8.v, fp8.v_scale, True)):  # values: tokens last
        got = fp8_kv_dequantize(codes, gs, length, t, dtype, tokens_last=last)
        rows = codes[..., :length].transpose(-1, -2) if last else codes[:, :, :length]
        want = (rows.float() * gs[:, :, :length_frames].repeat_interleave(t, 2)[..., None]).to(dtype)
        assert torch.equal(got, want), (got - want).abs().max()
    for codes, blocks, gs in ((store.k, store.k_block, store.k_scale), (store.v, store.v_block, store.v_scale)):
        got = nvfp4_kv_dequantize(codes, blocks, gs, length, t, dtype)
        gtok = gs[:, :, :length_frames].repeat_interleave(t, dim=2)[..., None]
        want = nvfp4.dequantize(codes[:, :, :length], blocks[:, :, :length], gtok, dtype=dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert torch.equal(got, want), (got - want).abs().max()
    return "ok"
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kv_dequant_kernel_interpreted_is_bit_exact():
    result = run_interpreted(CHECK + (
        "print(check(2, 3, 5, 7, 32, 4, torch.float32, 'cpu', 0));"
        "print(check(1, 2, 3, 33, 64, 3, torch.float32, 'cpu', 1));"
        "print(check(1, 3, 3, 5, 48, 2, torch.float32, 'cpu', 4))"
    ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "ok", "ok"]


@pytest.mark.gpu
def test_kv_dequant_kernel_on_gpu_at_5b_cache_size():
    namespace = {}
    exec(CHECK, namespace)
    assert namespace["check"](1, 24, 32, 880, 128, 32, torch.bfloat16, "cuda", 2) == "ok"
    assert namespace["check"](2, 3, 6, 100, 128, 5, torch.float32, "cuda", 3) == "ok"
    assert namespace["check"](1, 4, 4, 64, 48, 3, torch.bfloat16, "cuda", 5) == "ok"  # head_dim not a power of 2


WRITE = r'''
import torch
from longstream.quant.kv_storage import FP8KVStorage
from longstream.quant.kernels.kv_quant import fp8_kv_write

def check_write(b, h, slots, order, t, d, dtype, device, seed, nan=False):
    """The kernel's write of frames into the slots `order` (ring positions, out of order) against the eager twin:
    codes and scales bit for bit. K arrives strided ([B, n, H, D] transposed), one frame of V is all zero; with
    `nan` one value of K's last frame is NaN (the hardware cast's path: the interpreter's integer rounding has no
    NaN code)."""
    g = torch.Generator().manual_seed(seed)
    n = len(order) * t
    k = (torch.randn(b, n, h, d, generator=g) * torch.logspace(-4, 4, n)[None, :, None, None]).to(device, dtype)
    k = k.transpose(1, 2)
    v = torch.randn(b, h, n, d, generator=g).to(device, dtype)
    v[:, :, :t] = 0
    if nan:
        k[0, 0, n - 1, 0] = float("nan")
    index = torch.cat([torch.arange(s * t, (s + 1) * t) for s in order]).to(device)
    got = FP8KVStorage(b, h, slots * t, d, dtype, device, tokens_per_frame=t)
    want = FP8KVStorage(b, h, slots * t, d, dtype, device, tokens_per_frame=t)
    for x, codes, scale, last in ((k, got.k, got.k_scale, False), (v, got.v, got.v_scale, True)):
        fp8_kv_write(x, index, codes, scale, t, tokens_last=last)
    want.write_reference(index, k, v)
    for name in ("k", "v", "k_scale", "v_scale"):
        a, w = getattr(got, name), getattr(want, name)
        if a.dtype == torch.float8_e4m3fn:
            a, w = a.view(torch.uint8), w.view(torch.uint8)
        assert torch.equal(a, w), (name, (a.float() - w.float()).abs().max())
    assert bool((got.v_scale[:, :, order[0]] == 1).all())  # the zero frame
    return "ok"
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fp8_kv_write_kernel_interpreted_is_bit_exact():
    """Frames shorter and longer than the kernel's token step, head size 48 (not a power of two), bf16 input."""
    result = run_interpreted(WRITE + (
        "print(check_write(2, 3, 5, [3, 1], 20, 32, torch.float32, 'cpu', 0));"
        "print(check_write(1, 2, 4, [0, 2, 3], 33, 48, torch.float32, 'cpu', 1));"
        "print(check_write(1, 2, 3, [2, 0], 7, 64, torch.bfloat16, 'cpu', 2))"
    ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "ok", "ok"]


@pytest.mark.gpu
def test_fp8_kv_write_kernel_on_gpu_at_5b_chunk():
    """A chunk of 8 frames of 880 tokens into a 32-frame cache, hardware e4m3 conversion."""
    namespace = {}
    exec(WRITE, namespace)
    assert namespace["check_write"](1, 24, 32, list(range(12, 20)), 880, 128, torch.bfloat16, "cuda", 3,
                                    nan=True) == "ok"
    assert namespace["check_write"](2, 3, 6, [5, 0], 100, 48, torch.float32, "cuda", 4) == "ok"


ATTENTION = r'''
import torch
from longstream.model.attention import attention
from longstream.quant.kernels.kv_attention import nvfp4_kv_attention
from longstream.quant.kv_storage import NVFP4KVStorage

def check_attention(b, h, queries, frames, t, d, length, dtype, device, seed):
    """Fused NVFP4 KV attention against dequantize (the storage's read) + SDPA; returns the max error / max."""
    g = torch.Generator().manual_seed(seed)
    store = NVFP4KVStorage(b, h, frames * t, d, dtype, device, tokens_per_frame=t)
    k = torch.randn(b, h, frames * t, d, generator=g) * torch.logspace(-1, 1, frames).repeat_interleave(t)[:, None]
    v = torch.randn(b, h, frames * t, d, generator=g)
    store.write(torch.arange(frames * t, device=device), k.to(device), v.to(device))
    q = torch.randn(b, h, queries, d, generator=g).to(device, dtype)
    kd, vd = store.read(length)
    want = attention(q.float(), kd.float(), vd.float())
    got = nvfp4_kv_attention(q, (store.k, store.k_block, store.k_scale), (store.v, store.v_block, store.v_scale),
                             length, t)
    assert got.shape == q.shape and got.dtype == dtype
    return float((got.float() - want).abs().max() / want.abs().max())
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_nvfp4_kv_attention_interpreted_equals_dequantize_then_sdpa():
    """float32 queries: equal up to the softmax's summation order. Shapes: a key tail shorter than a tile, head
    size 48 (not a power of two), queries not a multiple of the tile, a cache longer than `length`."""
    result = run_interpreted(ATTENTION + (
        "print(check_attention(2, 3, 70, 3, 21, 48, 63, torch.float32, 'cpu', 0) < 1e-5);"
        "print(check_attention(1, 2, 64, 4, 32, 32, 128, torch.float32, 'cpu', 1) < 1e-5)"
    ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


@pytest.mark.gpu
def test_fused_nvfp4_kv_attention_on_gpu_at_5b_shape():
    namespace = {}
    exec(ATTENTION, namespace)
    assert namespace["check_attention"](1, 24, 7040, 32, 880, 128, 28160, torch.bfloat16, "cuda", 2) < 2e-2
    assert namespace["check_attention"](1, 4, 100, 3, 64, 48, 150, torch.bfloat16, "cuda", 3) < 2e-2
