"""FP8 E4M3 helpers: rowwise / block quantization vs float64 math, W8A8 reference and _scaled_mm."""
import pytest
import torch

from longstream.quant import fp8

E4M3 = torch.float8_e4m3fn


def _heavy(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(1.5 * torch.randn(shape, generator=g))


def _check_codes_vs_float64(x, q, scale_expanded):
    """q must be the E4M3 rounding of x / scale (float64 math), up to rare 1-ulp double-rounding."""
    ref = (x.double() / scale_expanded.double()).clamp(-448, 448).to(E4M3)
    diff = (q.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs()
    assert (diff <= 1).all() and (diff > 0).float().mean() < 1e-3


def _check_error_bound(x, q, scale_expanded):
    """|deq - x| <= half an E4M3 ulp: 2^-4 relative (normals), 2^-10 * scale (subnormals)."""
    deq = q.double() * scale_expanded.double()
    err = (deq - x.double()).abs()
    bound = torch.maximum(x.double().abs() * 2.0**-4, scale_expanded.double() * 2.0**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (err > 0).any()


@pytest.mark.parametrize("shape", [(64, 256), (3, 7, 96)])
def test_rowwise_matches_float64(shape):
    x = _heavy(shape, 0)
    x[..., 0, :] = 0.0  # an all-zero row
    q, s = fp8.quantize_rowwise(x)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (*shape[:-1], 1)
    amax = x.double().abs().amax(-1, keepdim=True)
    nz = amax > 0
    torch.testing.assert_close(s.double()[nz], (amax / 448)[nz], rtol=2e-7, atol=0)
    assert (s > 0).all() and (q[..., 0, :].float() == 0).all()
    # the row amax maps to +-448
    assert (q.float().abs().amax(-1, keepdim=True)[nz] == 448).all()
    _check_codes_vs_float64(x, q, s)
    _check_error_bound(x, q, s)
    assert torch.equal(fp8.dequantize(q, s), q.float() * s)


def test_block_1x128_matches_float64():
    x = _heavy((16, 384), 1)
    q, s = fp8.quantize_block(x, (1, 128))
    assert s.shape == (16, 3)
    amax = x.double().reshape(16, 3, 128).abs().amax(-1)
    torch.testing.assert_close(s.double(), amax / 448, rtol=2e-7, atol=0)
    se = s.repeat_interleave(128, dim=-1)
    _check_codes_vs_float64(x, q, se)
    _check_error_bound(x, q, se)
    assert torch.equal(fp8.dequantize(q, s), q.float() * se)


def test_block_128x128_matches_float64():
    x = _heavy((2, 256, 384), 2)
    q, s = fp8.quantize_block(x, (128, 128))
    assert s.shape == (2, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                tile = x[b, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
                assert abs(s[b, i, j].item() - tile.abs().max().item() / 448) <= 2e-7 * s[b, i, j].item()
    se = s.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)
    _check_codes_vs_float64(x, q, se)
    _check_error_bound(x, q, se)
    assert torch.equal(fp8.dequantize(q, s, dtype=torch.bfloat16), (q.float() * se).bfloat16())


def test_invalid_inputs_raise():
    x = torch.randn(4, 128)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError):
        fp8.quantize_rowwise(x)
    with pytest.raises(ValueError):
        fp8.quantize_block(torch.full((128, 128), float("inf")), (128, 128))
    with pytest.raises(ValueError):
        fp8.quantize_block(torch.randn(4, 100))
    with pytest.raises(ValueError):
        fp8.quantize_block(torch.randn(64, 128), (128, 128))
    with pytest.raises(ValueError):
        fp8.dequantize(torch.zeros(4, 128, dtype=E4M3), torch.ones(4, 3))


def test_fp8_linear_reference_vs_float64():
    x = _heavy((5, 7, 256), 3)
    w = torch.randn(96, 256) * 0.05
    bias = torch.randn(96)
    y = fp8.fp8_linear_reference(x, w, bias)
    assert y.shape == (5, 7, 96) and y.dtype == torch.float32
    exact = x.double() @ w.double().t() + bias.double()
    # each product has relative error <= (1 + 2^-4)^2 - 1 (plus the subnormal floor)
    bound = ((1 + 2.0**-4) ** 2 - 1) * (x.double().abs() @ w.double().abs().t()) + 1e-4
    assert ((y.double() - exact).abs() <= bound).all()
    # same as computing with dequantized operands
    xq, xs = fp8.quantize_rowwise(x)
    wq, ws = fp8.quantize_rowwise(w)
    deq = fp8.dequantize(xq, xs) @ fp8.dequantize(wq, ws).t() + bias
    torch.testing.assert_close(y, deq, rtol=1e-5, atol=1e-5)
    # and noticeably different from the unquantized product (it really quantized)
    assert (y.double() - exact).abs().max() > 1e-3
    assert fp8.fp8_linear_reference(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


def _rowwise_scaled_mm_supported(device):
    """torch._scaled_mm with rowwise scales: CPU since torch 2.13 (2.11 CPU is per-tensor only)."""
    a = torch.ones(16, 16, device=device).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_rowwise_matches_reference(out_dtype, device):
    if not _rowwise_scaled_mm_supported(device):
        with pytest.raises(RuntimeError, match="not available"):  # our wrapper says so clearly
            q, one = torch.ones(16, 16, device=device).to(E4M3), torch.ones(16, 1, device=device)
            fp8.scaled_mm_rowwise(q, one, q, one)
        pytest.skip(f"torch {torch.__version__} has no rowwise FP8 _scaled_mm on {device}")
    x = _heavy((4, 32, 128), 4).to(device)
    w = torch.randn(64, 128).to(device)
    bias = torch.randn(64).to(device)
    xq, xs = fp8.quantize_rowwise(x)
    wq, ws = fp8.quantize_rowwise(w)
    for b in (None, bias.to(out_dtype)):
        out = fp8.scaled_mm_rowwise(xq, xs, wq, ws, b, out_dtype=out_dtype)
        ref = fp8.fp8_matmul_reference(xq, xs, wq, ws, b, out_dtype=out_dtype)
        assert out.shape == ref.shape == (4, 32, 64) and out.dtype == out_dtype
        if device == "cpu":  # fp32 accumulation, only the summation order differs
            tol = 1e-5 * ref.float().abs().max().item()
            if out_dtype == torch.float32:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=tol)
            else:  # at most one bf16 rounding step apart
                torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=tol)
        else:  # Hopper FP8 tensor cores accumulate with fewer bits than fp32 (seen: ~1e-3 relative)
            mag = (xq.float().abs() * xs) @ (wq.float().abs() * ws).t()
            bound = 2.0**-9 * mag + (2.0**-7 * ref.float().abs() if out_dtype == torch.bfloat16 else 0)
            assert ((out.float() - ref.float()).abs() <= bound + 1e-6).all()
