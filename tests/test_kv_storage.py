"""Quantized KV storage: what is read back equals an independent quantization of each frame; memory."""

import pytest
import torch

from longstream.model.kv_cache import DenseKVStorage
from longstream.quant import nvfp4
from longstream.quant.kv_storage import FP8KVStorage, NVFP4KVStorage

T = 5  # tokens per frame


def frame_index(slots):
    return torch.cat([torch.arange(s * T, (s + 1) * T) for s in slots])


def expected(kind, frames):
    """frames [B, H, F, T, D] -> dequantized, each (b, h, frame) quantized alone in float64-checked steps."""
    out = torch.empty_like(frames)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in frames.shape[:3]]):
        block = frames[tuple(idx)]
        amax = block.abs().max()
        if kind == "fp8":
            scale = amax / 448
            out[tuple(idx)] = (block / scale).to(torch.float8_e4m3fn).float() * scale
        else:
            q = nvfp4.quantize(block, global_scale=amax / 2688)
            out[tuple(idx)] = q.dequantize()
    return out


@pytest.mark.parametrize("kind,cls", [("fp8", FP8KVStorage), ("nvfp4", NVFP4KVStorage)])
def test_read_back_equals_independent_per_frame_quantization(kind, cls):
    store = cls(2, 3, 6 * T, 32, torch.float32, "cpu", tokens_per_frame=T)
    slots = [4, 1, 2]  # out of order on purpose
    k = torch.randn(2, 3, 3 * T, 32) * torch.logspace(-2, 2, 3).repeat_interleave(T)[None, None, :, None]
    v = torch.randn(2, 3, 3 * T, 32)
    store.write(frame_index(slots), k, v)
    keys, values = store.read(5 * T)
    for got, x in ((keys, k), (values, v)):
        want = expected(kind, x.reshape(2, 3, 3, T, 32))
        for j, s in enumerate(slots):
            assert torch.equal(got[:, :, s * T : (s + 1) * T], want[:, :, j])
    rel = ((keys[:, :, 4 * T :] - k[:, :, :T]).norm() / k[:, :, :T].norm()).item()
    assert 0 < rel < (0.05 if kind == "fp8" else 0.15)


def test_nvfp4_per_row_global_scale_is_row_independent():
    x = torch.randn(4, 3, 32) * torch.tensor([1e-3, 1.0, 1e3])[None, :, None]
    g = nvfp4.global_scale_from_amax(x.abs().amax(-1, keepdim=True))
    q = nvfp4.quantize(x, global_scale=g)
    for i in range(4):
        for j in range(3):
            alone = nvfp4.quantize(x[i, j], global_scale=g[i, j, 0])
            assert torch.equal(q.data[i, j], alone.data)
            assert torch.equal(q.scale[i, j].view(torch.uint8), alone.scale.view(torch.uint8))
    with pytest.raises(ValueError, match="broadcast"):
        nvfp4.quantize(x, global_scale=torch.ones(4, 3, 2))


def test_memory_ratios_at_head_dim_128():
    args = (1, 24, 32 * 880, 128, torch.bfloat16, "cpu")
    dense = DenseKVStorage(*args).nbytes()
    assert dense / FP8KVStorage(*args, tokens_per_frame=880).nbytes() > 1.99
    assert dense / NVFP4KVStorage(*args, tokens_per_frame=880).nbytes() > 3.5


def test_partial_frame_write_is_refused():
    store = NVFP4KVStorage(1, 1, 4 * T, 16, torch.float32, "cpu", tokens_per_frame=T)
    with pytest.raises(ValueError, match="whole frames"):
        store.write(torch.arange(3), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16))


@pytest.mark.gpu
def test_nvfp4_write_on_gpu_equals_the_cpu_reference():
    """On CUDA the write quantizes with the Triton kernel (per-frame global scale): same bytes as the CPU."""
    k = torch.randn(1, 4, 3 * T, 48) * torch.logspace(-2, 2, 3).repeat_interleave(T)[None, None, :, None]
    v = torch.randn(1, 4, 3 * T, 48)
    stores = {dev: NVFP4KVStorage(1, 4, 4 * T, 48, torch.bfloat16, dev, tokens_per_frame=T) for dev in ("cpu", "cuda")}
    for dev, store in stores.items():
        store.write(frame_index([2, 0, 3]).to(dev), k.to(dev), v.to(dev))
    cpu, gpu = stores["cpu"], stores["cuda"]
    for a, b in ((cpu.k, gpu.k), (cpu.v, gpu.v), (cpu.k_block.view(torch.uint8), gpu.k_block.view(torch.uint8)),
                 (cpu.k_scale, gpu.k_scale)):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("fmt,cls", [("fp8", FP8KVStorage), ("nvfp4", NVFP4KVStorage)])
def test_storing_the_exchange_fields_equals_writing_the_values(fmt, cls):
    """`write_fields` with the sequence-parallel wire fields stores the bytes `write` stores for the values."""
    from longstream.parallel.ulysses import quantize_kv

    k = torch.randn(2, 3, 2 * T, 32) * torch.logspace(-3, 3, 2).repeat_interleave(T)[None, None, :, None]
    v = torch.randn(2, 3, 2 * T, 32)
    index = frame_index([3, 1])
    a, b = (cls(2, 3, 4 * T, 32, torch.float32, "cpu", tokens_per_frame=T) for _ in range(2))
    a.write(index, k, v)
    b.write_fields(index, quantize_kv(k, fmt, T), quantize_kv(v, fmt, T))
    for name, buf in vars(a).items():
        if isinstance(buf, torch.Tensor):
            other = vars(b)[name]
            assert torch.equal(buf.view(torch.uint8) if buf.dtype == torch.float8_e4m3fn else buf,
                               other.view(torch.uint8) if other.dtype == torch.float8_e4m3fn else other), name
