"""Reference NVFP4 codec: bit-exactness with torchao, error bounds, rounding modes, 16x16 blocks."""
import math
import zlib

import pytest
import torch

from longstream.quant import nvfp4 as nv

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _torchao():
    mod = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    return mod.nvfp4_quantize, mod.per_tensor_amax_to_scale


def _torchao_quantize(x):
    """torchao's two-level NVFP4 on x viewed as 2D [-1, K]: (packed uint8, scale as uint8, global)."""
    nvfp4_quantize, amax_to_scale = _torchao()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    g = amax_to_scale(torch.max(torch.abs(x2)))
    scale, data = nvfp4_quantize(x2, block_size=16, per_tensor_scale=g)
    return data.reshape(-1, x.shape[-1] // 2), scale.view(torch.uint8).reshape(-1, x.shape[-1] // 16), g


def _assert_matches_torchao(x):
    q = nv.quantize(x)
    data, scale, g = _torchao_quantize(x)
    assert q.data.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert q.scale.shape == (*x.shape[:-1], x.shape[-1] // 16)
    assert q.scale.dtype == torch.float8_e4m3fn and q.data.dtype == torch.uint8
    assert q.global_scale.dtype == torch.float32 and q.global_scale.dim() == 0
    assert torch.isfinite(scale.view(torch.float8_e4m3fn).float()).all()  # only compare finite cases
    assert q.global_scale.view(torch.int32) == g.float().reshape(()).view(torch.int32)
    assert torch.equal(q.scale.view(torch.uint8).reshape(scale.shape), scale)
    assert torch.equal(q.data.reshape(data.shape), data)
    return q


def _block_pow2_tensor(rows, k, values, gen):
    """Tensor whose default global scale is exactly 1 and whose blocks (except one) have power-of-two
    E4M3 scales, so x * recip is exact and `values` land exactly (on ties, for instance)."""
    nb = k // 16
    e = torch.randint(-6, 9, (rows, nb, 1), generator=gen).double()
    idx = torch.randint(0, len(values), (rows, nb, 16), generator=gen)
    sign = torch.where(torch.rand(rows, nb, 16, generator=gen) < 0.5, -1.0, 1.0).double()
    v = torch.tensor(values, dtype=torch.float64)[idx] * sign
    v[..., 0] = 6.0  # block amax = 6 * 2^e -> block scale exactly 2^e
    x = v * torch.pow(2.0, e)
    x[0, 0, :] = 0.0
    x[0, 0, 0] = 2688.0  # tensor amax 6 * 448 -> global scale exactly 1
    return x.reshape(rows, k).float(), v.reshape(rows, k)


# ---------------------------------------------------------------- helpers


def test_e2m1_table_and_pack_layout():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = nv.e2m1_decode(codes)
    expected = torch.cat([E2M1_GRID, -E2M1_GRID])
    assert torch.equal(vals, expected)
    assert torch.equal(nv.e2m1_encode(vals), codes)  # includes -0.0 -> code 8
    # element 2i in the low nibble, sign is bit 3
    packed = nv.pack_fp4(torch.tensor([1, 2, 15, 8], dtype=torch.uint8))
    assert packed.tolist() == [0x21, 0x8F]
    rnd = torch.randint(0, 16, (3, 5, 32), dtype=torch.uint8)
    assert torch.equal(nv.unpack_fp4(nv.pack_fp4(rnd)), rnd)
    with pytest.raises(ValueError):
        nv.pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_e2m1_rne_ties_to_even():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert torch.equal(nv.e2m1_decode(nv.e2m1_encode(ties)), expect)
    assert torch.equal(nv.e2m1_decode(nv.e2m1_encode(-ties)), -expect)
    # just off the ties goes to the nearest value
    up = torch.nextafter(ties, torch.full_like(ties, 10.0))
    down = torch.nextafter(ties, torch.zeros_like(ties))
    assert torch.equal(nv.e2m1_decode(nv.e2m1_encode(up)), torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]))
    assert torch.equal(nv.e2m1_decode(nv.e2m1_encode(down)), torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]))
    # saturation
    assert nv.e2m1_decode(nv.e2m1_encode(torch.tensor([7.0, -1e30]))).tolist() == [6.0, -6.0]


def test_e2m1_encode_matches_torchao_elementwise():
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    v = torch.cat([torch.linspace(-6.5, 6.5, 20001), torch.randn(5000) * 3, torch.tensor([-0.0, 0.0])])
    mids = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    v = torch.cat([v, near, -near])
    assert torch.equal(nv.e2m1_encode(v), kernels.f32_to_f4_unpacked(v))


# ---------------------------------------------------------------- torchao bit-exactness


def _normal(shape, gen):
    return torch.randn(shape, generator=gen)


def _heavy(shape, gen):
    return torch.randn(shape, generator=gen) * torch.exp(3 * torch.randn(shape, generator=gen))


def _cauchy(shape, gen):
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.tan(math.pi * (u - 0.5)).clamp(-1e30, 1e30).float()


def _student_t3(shape, gen):
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn(*shape, 3, generator=gen, dtype=torch.float64) ** 2).sum(-1)
    return (z / torch.sqrt(chi2 / 3)).float()


def _tiny(shape, gen):
    mag = torch.pow(10.0, torch.empty(shape, dtype=torch.float64).uniform_(-30, -8, generator=gen))
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * mag).float()


def _block_constant(shape, gen):
    *lead, k = shape
    c = torch.randn(*lead, k // 16, 1, generator=gen) * torch.exp(2 * torch.randn(*lead, k // 16, 1, generator=gen))
    return c.expand(*lead, k // 16, 16).reshape(shape).contiguous()


def _with_zero_blocks(shape, gen):
    x = torch.randn(shape, generator=gen)
    mask = torch.rand(*shape[:-1], shape[-1] // 16, 1, generator=gen) < 0.3
    mask.view(-1)[0] = False  # keep the tensor nonzero
    return (x.reshape(*shape[:-1], -1, 16) * ~mask).reshape(shape)


GENERATORS = [_normal, _heavy, _cauchy, _student_t3, _tiny, _block_constant, _with_zero_blocks]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 64), (2, 2, 4, 32), (16,)])
def test_bit_exact_with_torchao(make, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{make.__name__}{shape}".encode()))
    x = make(shape, gen)
    assert x.abs().max() > 0
    _assert_matches_torchao(x)


def test_bit_exact_with_torchao_bf16_and_fp16_inputs():
    gen = torch.Generator().manual_seed(1)
    x = _heavy((32, 128), gen)
    _assert_matches_torchao(x.bfloat16())
    xh = _normal((32, 128), gen).half()
    assert torch.equal(nv.quantize(xh).data, nv.quantize(xh.float()).data)  # fp16 is cast to fp32 first
    _assert_matches_torchao(xh.float())


def test_exact_ties_match_torchao_and_round_to_even():
    gen = torch.Generator().manual_seed(2)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x, v = _block_pow2_tensor(48, 128, ties, gen)
    q = _assert_matches_torchao(x)
    assert q.global_scale.item() == 1.0
    codes = nv.unpack_fp4(q.data)
    rne = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 6.0: 6.0}
    expect = v.abs().apply_(lambda a: rne[a]).float() * torch.sign(v).float()
    got = nv.e2m1_decode(codes)
    assert torch.equal(got[1:], expect[1:].float())  # row 0 holds the 2688 block


def test_near_ties_with_non_power_of_two_scales_match_torchao():
    """Elements placed within a few ulps of E2M1 ties after scaling: catches any change in the
    order of float32 operations (e.g. 1/(g*s) instead of (1/g)/s, or division instead of multiply)."""
    gen = torch.Generator().manual_seed(11)
    rows, k = 256, 128
    x = _heavy((rows, k), gen).reshape(rows, k // 16, 16)
    x[..., 0] = x.abs().amax(-1) * 1.01  # element 0 stays the block amax
    g = x.abs().amax() / 2688.0
    s = torch.clamp(x[..., 0] / 6.0 / g, min=2.0**-6, max=448.0).to(torch.float8_e4m3fn).float()
    recip = (1.0 / g) / s
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    t = ties[torch.randint(0, 7, (rows, k // 16, 15), generator=gen)]
    near = (t / recip.unsqueeze(-1)).float()
    steps = torch.randint(-2, 3, near.shape, generator=gen)
    for d in (-1, 1):  # move |steps| ulps towards +-inf
        for _ in range(2):
            mask = steps * d > 0
            near = torch.where(mask, torch.nextafter(near, torch.full_like(near, d * math.inf)), near)
            steps = steps - d * mask.long()
    sign = torch.where(torch.rand(near.shape, generator=gen) < 0.5, -1.0, 1.0)
    amax = x[..., :1]
    x[..., 1:] = torch.where(near < amax, near, amax * 0.5) * sign  # blocks with s at the 2^-6 floor
    x = x.reshape(rows, k)
    assert (x.reshape(rows, -1, 16).abs().argmax(-1) == 0).all()
    _assert_matches_torchao(x)


def test_block_amax_near_e4m3_scale_midpoints_match_torchao():
    """Block amaxes whose (amax/6)/g lands within ulps of a midpoint between E4M3 values: catches
    changes in how the block scale is computed (amax*(1/6), amax/(6g), ...)."""
    gen = torch.Generator().manual_seed(12)
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3) & (e4m3 >= 2.0**-6)].unique()  # sorted normal values
    mids = (e4m3[1:] + e4m3[:-1]) / 2
    rows, nb = 64, 8
    g = torch.tensor(0.0123456789, dtype=torch.float32)
    m = mids[torch.randint(0, len(mids), (rows, nb), generator=gen)]
    amax = (m * 6.0 * g).float()
    steps = torch.randint(-3, 4, amax.shape, generator=gen)
    for d in (-1, 1):
        for _ in range(3):
            mask = steps * d > 0
            amax = torch.where(mask, torch.nextafter(amax, torch.full_like(amax, d * math.inf)), amax)
            steps = steps - d * mask.long()
    x = torch.rand(rows, nb, 16, generator=gen) * amax.unsqueeze(-1) * 0.9
    x[..., 3] = amax
    x = x.reshape(rows, nb * 16)
    x[0, 0] = 2688.0 * g  # tensor amax -> global scale ~ g
    _assert_matches_torchao(x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0))


# ---------------------------------------------------------------- round trip and error bounds


def test_exactly_representable_values_round_trip_exactly():
    gen = torch.Generator().manual_seed(3)
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x, _ = _block_pow2_tensor(64, 256, grid, gen)
    # also non-power-of-two E4M3 block scales: values grid * s with s = 1.25 * 2^e, 1.75 * 2^e
    odd = x.clone()
    odd[1::2] *= 1.75
    odd[2::4] *= 1.25
    for t in (x, odd, x.reshape(4, 16, 256)):
        q = nv.quantize(t)
        assert torch.equal(q.dequantize(), t)
    assert torch.equal(nv.fake_quantize(x.bfloat16()), x.bfloat16())


@pytest.mark.parametrize("make", [_normal, _heavy, _student_t3, _with_zero_blocks])
def test_dequantize_error_bounded_by_block_amax(make):
    gen = torch.Generator().manual_seed(4)
    x = make((64, 512), gen)
    q = nv.quantize(x)
    y = q.dequantize()
    assert torch.equal(y, nv.dequantize(q.data, q.scale, q.global_scale))
    assert torch.equal(nv.fake_quantize(x), y)
    xb, yb = x.reshape(64, -1, 16).double(), y.reshape(64, -1, 16).double()
    err = (yb - xb).abs()
    block_amax = xb.abs().amax(-1, keepdim=True)
    step = (q.global_scale.double() * q.scale.double()).unsqueeze(-1)  # decoded block scale
    # per element: at most half the E2M1 spacing at |v| (0.25 below 2, 0.5 below 4, 1 above)
    v = xb.abs() / torch.where(step > 0, step, 1)
    half = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
    assert (err <= half * step * (1 + 1e-5) + 1e-30).all()
    # per block: decoded scale is within E4M3 rounding of amax / 6 (blocks above the 2^-6 floor)
    big = (block_amax / 6) / q.global_scale.double() > 2**-6
    assert (err <= block_amax / 6 * (1 + 2**-4) * (1 + 1e-5))[big.expand_as(err)].all()
    assert (err[big.expand_as(err)] > 0).any()  # it really quantized something
    # zero blocks decode to exact zeros
    assert (yb[(block_amax == 0).expand_as(yb)] == 0).all()


def test_all_zero_tensor_is_clean():
    for x in (torch.zeros(4, 32), torch.zeros(2, 3, 16).bfloat16(), -torch.zeros(16, 16)):
        for block in ("1x16", "16x16") if x.shape[-2] % 16 == 0 else ("1x16",):
            q = nv.quantize(x, block=block)
            assert q.global_scale.item() == 0.0
            assert (q.data == 0).all() and (q.scale.view(torch.uint8) == 0).all()
            y = q.dequantize()
            assert torch.equal(y, torch.zeros_like(y)) and not torch.isnan(y).any()
    # a caller-supplied zero global scale also encodes zeros (no NaN)
    q = nv.quantize(torch.randn(4, 32), global_scale=0.0)
    assert (q.dequantize() == 0).all()


def test_explicit_global_scale_matches_torchao():
    nvfp4_quantize, _ = _torchao()
    gen = torch.Generator().manual_seed(5)
    x = _heavy((32, 64), gen)
    g = torch.tensor(0.37 * x.abs().max().item() / 2688)  # calibrated too small: saturates
    scale, data = nvfp4_quantize(x, block_size=16, per_tensor_scale=g)
    q = nv.quantize(x, global_scale=g)
    assert torch.equal(q.data, data) and torch.equal(q.scale.view(torch.uint8), scale.view(torch.uint8))


def test_invalid_inputs_raise():
    x = torch.randn(4, 32)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            nv.quantize(y)
        with pytest.raises(ValueError):
            nv.quantize(y.bfloat16(), block="16x16")
    with pytest.raises(ValueError):
        nv.quantize(torch.randn(4, 24))
    with pytest.raises(ValueError):
        nv.quantize(torch.randn(8, 32), block="16x16")
    with pytest.raises(ValueError):
        nv.quantize(x, block=(1, 32))
    with pytest.raises(ValueError):
        nv.quantize(x, rounding="floor")
    with pytest.raises(ValueError):
        nv.quantize(x, global_scale=-1.0)
    with pytest.raises(ValueError):
        nv.quantize(torch.arange(32).reshape(2, 16))


# ---------------------------------------------------------------- stochastic rounding


def _scaled(x, q):
    """The codec's scaled values v = clamp(x * ((1/g)/s), -6, 6) (float32, same ops as quantize)."""
    recip = (1.0 / q.global_scale) / q.scale.float()
    v = x.float().reshape(*x.shape[:-1], -1, 16) * recip.unsqueeze(-1)
    return v.clamp(-6, 6).reshape(x.shape)


def test_stochastic_rounding_unbiased_and_neighbours():
    gen = torch.Generator().manual_seed(6)
    x0 = _heavy((4, 64), gen)
    n = 4000
    x = x0.unsqueeze(0).expand(n, 4, 64).contiguous()
    q = nv.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    q_rne = nv.quantize(x0)
    su = q.scale.view(torch.uint8)
    assert torch.equal(su[0], q_rne.scale.view(torch.uint8)) and (su == su[:1]).all()
    assert torch.equal(q.global_scale, q_rne.global_scale)

    # every draw is one of the two grid neighbours of the scaled value
    v = _scaled(x0, q_rne).double()
    a = v.abs()
    grid = E2M1_GRID.double()
    lo = grid[(a.unsqueeze(-1) >= grid).sum(-1) - 1]
    hi = grid[(a.unsqueeze(-1) > grid).sum(-1).clamp(max=7)]
    hi = torch.where(a >= 6, lo, hi)
    got = nv.e2m1_decode(nv.unpack_fp4(q.data)).double()  # [n, 4, 64]
    mag = got.abs()
    assert ((mag == lo) | (mag == hi)).all()
    assert (torch.sign(got) * torch.sign(v) >= 0).all()
    p = (a - lo) / torch.where(hi > lo, hi - lo, 1.0)  # P(round up)
    frac_up = ((mag == hi) & (hi > lo)).double().mean(0)
    mid = (p > 0.05) & (p < 0.95)
    assert mid.double().mean() > 0.3 and ((frac_up > 0) & (frac_up < 1))[mid].all()  # really random
    assert ((frac_up - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n) + 1e-12).all()

    # unbiased: mean error in the scaled domain within 3 standard errors (pooled and per element)
    err = got - v
    se_pool = err.std() / math.sqrt(err.numel())
    assert err.mean().abs() < 3 * se_pool
    sd = (hi - lo) * torch.sqrt(p * (1 - p))  # exact per-element std of one draw
    mean_err = err.mean(0)
    assert (mean_err.abs() <= 5 * sd / math.sqrt(n) + 1e-12).all()
    # RNE has the smaller per-draw error (SR trades variance for unbiasedness)
    err_rne = nv.e2m1_decode(nv.unpack_fp4(q_rne.data)).double() - v
    assert err_rne.abs().mean() < err.abs().mean()


def test_stochastic_rounding_reproducible_and_exact_values_fixed():
    gen = torch.Generator().manual_seed(8)
    x = _normal((16, 64), gen)
    a = nv.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    b = nv.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    c = nv.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    exact, _ = _block_pow2_tensor(16, 64, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], gen)
    q = nv.quantize(exact, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(q.dequantize(), exact)
    q2 = nv.quantize(x, block="16x16", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(q2.scale.view(torch.uint8), nv.quantize(x, block="16x16").scale.view(torch.uint8))


# ---------------------------------------------------------------- 16x16 blocks


@pytest.mark.parametrize("shape", [(64, 128), (2, 32, 48)])
def test_16x16_tiles_share_scale(shape):
    gen = torch.Generator().manual_seed(9)
    w = _heavy(shape, gen)
    q = nv.quantize(w, block=(16, 16))
    assert q.block == (16, 16) and q.shape == w.shape
    s = q.scale.float()
    *lead, m, kb = s.shape
    tiles = s.reshape(*lead, m // 16, 16, kb)
    assert (tiles == tiles[..., :1, :]).all()
    # tile scale = the largest 1x16 scale of its rows (same global scale, monotone rounding)
    q1 = nv.quantize(w)
    assert torch.equal(tiles[..., 0, :], q1.scale.float().reshape(*lead, m // 16, 16, kb).amax(-2))
    assert not torch.equal(q.scale.view(torch.uint8), q1.scale.view(torch.uint8))
    # error bound with the tile amax
    y = q.dequantize()
    tile_amax = w.abs().reshape(*lead, m // 16, 16, kb, 16).amax(dim=(-3, -1), keepdim=True)
    err = (y - w).abs().reshape(*lead, m // 16, 16, kb, 16)
    assert (err <= tile_amax / 6 * (1 + 2**-4) * (1 + 1e-5)).all()


@pytest.mark.parametrize("make", [_normal, _heavy, _with_zero_blocks])
@pytest.mark.parametrize("shape", [(64, 128), (3, 48, 32)])
def test_16x16_transpose_is_quantization_of_transpose(make, shape):
    gen = torch.Generator().manual_seed(10)
    w = make(shape, gen)
    qt = nv.quantize(w, block="16x16").transpose()
    ref = nv.quantize(w.transpose(-1, -2).contiguous(), block="16x16")
    assert qt.shape == ref.shape == w.transpose(-1, -2).shape
    assert torch.equal(qt.data, ref.data)
    assert torch.equal(qt.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(qt.global_scale, ref.global_scale)
    assert torch.equal(qt.dequantize(), nv.quantize(w, block="16x16").dequantize().transpose(-1, -2))
    with pytest.raises(ValueError):
        nv.quantize(w).transpose()


# ---------------------------------------------------------------- device independence


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit():
    gen = torch.Generator().manual_seed(13)
    for shape in [(256, 1024), (4, 64, 512), (7, 32, 160)]:
        x = _heavy(shape, gen)
        for block in ("1x16", "16x16"):
            a, b = nv.quantize(x, block=block), nv.quantize(x.cuda(), block=block)
            assert torch.equal(a.data, b.data.cpu())
            assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8).cpu())
            assert torch.equal(a.global_scale, b.global_scale.cpu())
            assert torch.equal(a.dequantize(), b.dequantize().cpu())
        q = nv.quantize(x.cuda(), rounding="stochastic", generator=torch.Generator("cuda").manual_seed(0))
        assert q.data.is_cuda and torch.isfinite(q.dequantize()).all()
