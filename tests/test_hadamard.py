"""Random Hadamard transform on 16-blocks: orthogonality, inverse, and float64 reference."""
import pytest
import torch

from longstream.quant import hadamard as rht


def _reference_matrix(seed, k):
    """Block-diagonal float64 matrix T with x_row @ T == random_hadamard(x_row)."""
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    d = rht.random_signs(seed, dtype=torch.float64)
    m = torch.diag(d) @ (h / 4)
    return torch.block_diag(*[m] * (k // 16))


def test_hadamard_matrix_orthonormal():
    h = rht.hadamard_matrix(16)
    assert torch.equal(h.abs(), torch.full((16, 16), 0.25))
    assert torch.equal(h @ h.t(), torch.eye(16))
    assert torch.equal(h, h.t())
    with pytest.raises(ValueError):
        rht.hadamard_matrix(12)


def test_random_signs_deterministic():
    a, b, c = rht.random_signs(3), rht.random_signs(3), rht.random_signs(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("shape", [(32, 64), (2, 3, 128)])
def test_matches_float64_reference_and_inverts(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    seed = 1234
    y = rht.random_hadamard(x, seed)
    t = _reference_matrix(seed, shape[-1])
    ref = x.double() @ t
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * x.abs().max().item())
    assert not torch.allclose(y, x)
    back = rht.inverse_random_hadamard(y, seed)
    torch.testing.assert_close(back.double(), x.double(), rtol=1e-5, atol=1e-6 * x.abs().max().item())
    # a different seed does not invert it
    assert not torch.allclose(rht.inverse_random_hadamard(y, seed + 1), x, atol=1e-3)


def test_orthogonality_preserves_dot_products():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(48, 256, generator=g)
    b = torch.randn(40, 256, generator=g)
    ta, tb = rht.random_hadamard(a, 7), rht.random_hadamard(b, 7)
    exact = a.double() @ b.double().t()
    torch.testing.assert_close((ta.double() @ tb.double().t()), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ta.double().norm(dim=-1), a.double().norm(dim=-1), rtol=1e-6, atol=0)
    # mismatched seeds break the identity
    tc = rht.random_hadamard(b, 8)
    assert (ta.double() @ tc.double().t() - exact).abs().max() > 1.0


def test_spreads_outliers_and_keeps_dtype():
    x = torch.zeros(2, 32)
    x[0, 5] = 100.0
    y = rht.random_hadamard(x, 0)
    assert torch.equal(y[0, :16].abs(), torch.full((16,), 25.0)) and (y[0, 16:] == 0).all()
    xb = torch.randn(4, 64).bfloat16()
    assert rht.random_hadamard(xb, 0).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        rht.random_hadamard(torch.randn(4, 24), 0)
