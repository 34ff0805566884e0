"""The rowwise FP8 quantize kernel against its reference twin (`fp8.quantize_rowwise`).

Bit for bit, under Triton's interpreter (CPU, child process: the kernel's integer e4m3 rounding) and on a GPU (its
hardware conversion). Inputs cover several magnitudes per row, an all-zero row, signed zeros and values that land
in e4m3's subnormal range.
"""

import importlib.util

import pytest

from _interpreted import run_interpreted

CHECK = r'''
import torch
from longstream.quant import fp8
from longstream.quant.kernels.fp8_quant import fp8_quantize_rowwise_triton

def check(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    x = x * torch.exp(4 * torch.randn(shape[-1], generator=g))  # e4m3 subnormals after scaling
    x[..., 0, :] = 0  # an all-zero row
    x[..., 1, :3] = -0.0
    x = x.to(device=device, dtype=torch.bfloat16)
    q, s = fp8_quantize_rowwise_triton(x)
    q_ref, s_ref = fp8.quantize_rowwise(x)
    assert torch.equal(s, s_ref), (s - s_ref).abs().max()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (q.float() - q_ref.float()).abs().max()
    return "ok"
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fp8_rowwise_kernel_interpreted():
    result = run_interpreted(CHECK + "print(check((2, 5, 96), 'cpu', 0)); print(check((7, 300), 'cpu', 1))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "ok"]


@pytest.mark.gpu
def test_fp8_rowwise_kernel_on_gpu_bit_exact():
    namespace = {}
    exec(CHECK, namespace)
    assert namespace["check"]((7040, 3072), "cuda", 2) == "ok"
    assert namespace["check"]((3, 14336), "cuda", 3) == "ok"
