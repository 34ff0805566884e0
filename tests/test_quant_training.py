"""Training linears: NVFP4 (fprop/dgrad/wgrad on NVFP4 operands, 2D weight blocks, stochastic rounding, random
Hadamard on wgrad) and FP8, against reference emulations written here from the codecs."""
import copy

import pytest
import torch
import torch.nn as nn

from longstream.config import TransformerConfig
from longstream.model.transformer import CausalWanTransformer
from longstream.quant import (FP8TrainingLinear, NVFP4TrainingConfig, NVFP4TrainingLinear, QuantError,
                              convert_for_training, training_summary)
from longstream.quant import fp8, hadamard
from longstream.quant import nvfp4 as nv

M_SHAPE, K, N = (3, 13), 64, 48  # 39 tokens: not a multiple of 16, so wgrad pads


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*M_SHAPE, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype)
    dy = torch.randn(*M_SHAPE, N, generator=g, dtype=dtype)
    return x, w, b, dy


def _run(layer_or_fn, x, w, b, dy):
    """(y, dx, dw, db) of a layer built around parameters w, b."""
    x = x.clone().requires_grad_(True)
    y = layer_or_fn(x)
    y.backward(dy)
    return y.detach(), x.grad, layer_or_fn.weight.grad, layer_or_fn.bias.grad


def _nvfp4_layer(w, b, **kwargs):
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return NVFP4TrainingLinear.from_linear(lin, **kwargs)


def _padded(t):
    m = t.shape[0]
    out = torch.zeros(-(-m // 16) * 16, t.shape[1], dtype=t.dtype)
    out[:m] = t
    return out


def _emulate_nvfp4(x, w, b, dy, seed, stochastic, hadamard_seed=0):
    """Independent emulation in float64 of the recipe (the draw order is part of the contract: dgrad's dY,
    then wgrad's H(dY^T))."""
    deq = lambda q: q.dequantize(torch.float64)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    grad_q = dict(rounding="stochastic", generator=gen) if stochastic else {}
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    wq = nv.quantize(w, block=(16, 16))
    y = deq(nv.quantize(x2)) @ deq(wq).t() + b.double()
    dx = deq(nv.quantize(dy2, **grad_q)) @ deq(wq)  # W^T's codes and scales are W's: no requantization
    a = hadamard.random_hadamard(_padded(dy2).t().contiguous(), hadamard_seed)
    c = hadamard.random_hadamard(_padded(x2).t().contiguous(), hadamard_seed)
    dw = deq(nv.quantize(a, **grad_q)) @ deq(nv.quantize(c)).t()
    return y.reshape(*M_SHAPE, N), dx.reshape(x.shape), dw, dy2.double().sum(0)


@pytest.mark.parametrize("stochastic", [True, False])
def test_nvfp4_gradients_equal_the_emulation(stochastic):
    x, w, b, dy = _problem()
    cfg = NVFP4TrainingConfig(stochastic=stochastic, hadamard_seed=3)
    layer = _nvfp4_layer(w, b, config=cfg, generator=torch.Generator().manual_seed(11))
    got = _run(layer, x, w, b, dy)
    want = _emulate_nvfp4(x, w, b, dy, seed=11, stochastic=stochastic, hadamard_seed=3)
    for g, r, name in zip(got, want, ("y", "dx", "dw", "db")):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert _max_rel(g, r) < 1e-5, (name, _max_rel(g, r))


def test_stochastic_rounding_is_deterministic_given_the_generator():
    x, w, b, dy = _problem()
    runs = [_run(_nvfp4_layer(w, b, generator=torch.Generator().manual_seed(s)), x, w, b, dy) for s in (1, 1, 2)]
    for a, c in zip(runs[0], runs[1]):
        assert torch.equal(a, c)
    assert not torch.equal(runs[0][1], runs[2][1]) and not torch.equal(runs[0][2], runs[2][2])
    # RNE is reproducible without any generator
    rne = [_run(_nvfp4_layer(w, b, config=NVFP4TrainingConfig(stochastic=False)), x, w, b, dy) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*rne))


def test_stochastic_rounding_is_unbiased_on_average():
    """The mean of SR gradients over draws approaches the unquantized-dY gradient; RNE keeps a fixed bias."""
    x, w, b, dy = _problem()
    gen = torch.Generator().manual_seed(0)
    dxs = [_run(_nvfp4_layer(w, b, generator=gen), x, w, b, dy)[1] for _ in range(64)]
    exact_dy = dy.reshape(-1, N).double() @ nv.quantize(w, block=(16, 16)).dequantize(torch.float64)
    mean_err = _max_rel(torch.stack(dxs).double().mean(0).reshape(-1, K), exact_dy)
    one_err = _max_rel(dxs[0].reshape(-1, K), exact_dy)
    rne = _run(_nvfp4_layer(w, b, config=NVFP4TrainingConfig(stochastic=False)), x, w, b, dy)[1]
    rne_err = _max_rel(rne.reshape(-1, K), exact_dy)
    assert mean_err < min(one_err, rne_err) / 3, (mean_err, one_err, rne_err)  # measured 0.016, 0.098, 0.072


def test_hadamard_cancels_without_quantization():
    x, w, b, dy = _problem(torch.float64)
    exact = dy.reshape(-1, N).t() @ x.reshape(-1, K)
    dws = []
    for use_h in (True, False):
        cfg = NVFP4TrainingConfig(quantize=False, hadamard=use_h, hadamard_seed=7)
        layer = _nvfp4_layer(w, b, config=cfg).double()
        dws.append(_run(layer, x, w, b, dy)[2])
    assert dws[0].dtype == torch.float64
    assert (dws[0] - dws[1]).abs().max() < 1e-12
    assert (dws[1] - exact).abs().max() < 1e-12


def test_nvfp4_master_weight_and_activation_dtypes():
    x, w, b, dy = _problem()
    layer = _nvfp4_layer(w, b)  # float32 master weights
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = layer(xb)
    y.backward(dy.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


def test_frozen_weight_skips_wgrad():
    x, w, b, dy = _problem()
    layer = _nvfp4_layer(w, b, config=NVFP4TrainingConfig(stochastic=False))
    layer.weight.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    layer(xg).backward(dy)
    assert layer.weight.grad is None and xg.grad is not None


def _emulate_fp8(x, w, b, dy):
    def mm(a, c):  # rowwise E4M3 of both operands along the reduction (last) dim, float64 math
        aq, as_ = fp8.quantize_rowwise(a.contiguous())
        cq, cs = fp8.quantize_rowwise(c.contiguous())
        return (aq.double() @ cq.double().t()) * as_.double() * cs.double().t()

    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    y = mm(x2, w) + b.double()
    dx = mm(dy2, w.t())
    dw = mm(_padded(dy2).t(), _padded(x2).t())
    return y.reshape(*M_SHAPE, N), dx.reshape(x.shape), dw, dy2.double().sum(0)


def test_fp8_gradients_equal_the_emulation():
    x, w, b, dy = _problem()
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    got = _run(FP8TrainingLinear.from_linear(lin), x, w, b, dy)
    for g, r, name in zip(got, _emulate_fp8(x, w, b, dy), ("y", "dx", "dw", "db")):
        assert _max_rel(g, r) < 1e-5, (name, _max_rel(g, r))


def test_mode_and_shape_errors():
    with pytest.raises(QuantError, match="unknown training mode 'int4'"):
        convert_for_training(nn.Sequential(nn.Linear(16, 16)), "int4")
    with pytest.raises(QuantError, match="multiples of 16"):
        NVFP4TrainingLinear(24, 32)


def test_transformer_training_step_in_nvfp4():
    """Tiny CausalWanTransformer: 20 block linears in NVFP4, 6 conditioning/output ones in high precision.
    Measured: cosine(NVFP4 grads, float grads) over all parameters 0.998 (fp8 0.9999)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32)
    model = CausalWanTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    t, text = torch.tensor([500.0, 300.0]), torch.randn(2, 7, 32, generator=g)

    def grads(m):
        m.zero_grad()
        ((m(x, t, text, causal=True, chunk_frames=2) - target) ** 2).mean().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    ref = grads(model)
    q = convert_for_training(copy.deepcopy(model), "nvfp4", generator=torch.Generator().manual_seed(0))
    summary = training_summary(q)
    assert len(summary["nvfp4"]) == 20 and len(summary["bf16"]) == 6 and "proj_out" in summary["bf16"]
    assert list(q.state_dict()) == list(model.state_dict())  # parameter names unchanged
    got = grads(q)
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, ref, 0) > 0.98
    before = [p.detach().clone() for p in q.parameters()]
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, q.parameters()) if p.grad.abs().sum() > 0)


def test_toy_regression_nvfp4_loss_falls_like_bf16():
    """Student MLP 32-64-16 fits a random tanh teacher; Adam lr 3e-3, 300 steps of 128 samples, same data and init
    for every mode. Eval MSE on 1024 held-out samples, each model evaluated in its own forward precision.
    Measured (seed 0; seeds 0-4 gave NVFP4/bf16 ratios 1.25-1.32): initial 0.43; bf16 0.0282, fp8 0.0287,
    nvfp4 0.0372. Required: nvfp4 <= 1.5x bf16, fp8 <= 1.2x bf16, both below 0.15x the initial loss."""
    torch.manual_seed(0)
    a, c = torch.randn(32, 64) / 32**0.5, torch.randn(64, 16) / 64**0.5
    teacher = lambda v: torch.tanh(v @ a) @ c  # noqa: E731
    base = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    x_eval = torch.randn(1024, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        initial = ((base(x_eval) - teacher(x_eval)) ** 2).mean().item()
    final = {}
    for mode in ("bf16", "fp8", "nvfp4"):
        m = convert_for_training(copy.deepcopy(base), mode, skip=(), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        data = torch.Generator().manual_seed(2)
        for _ in range(300):
            v = torch.randn(128, 32, generator=data)
            loss = ((m(v) - teacher(v)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final[mode] = ((m(x_eval) - teacher(x_eval)) ** 2).mean().item()
    print(f"initial {initial:.4f}, final {final}")
    assert final["nvfp4"] <= 1.5 * final["bf16"], final
    assert final["fp8"] <= 1.2 * final["bf16"], final
    assert max(final.values()) < 0.15 * initial, (initial, final)


@pytest.mark.gpu
def test_nvfp4_gradients_on_the_gpu_equal_the_emulation():
    """The same recipe on CUDA (Triton quantize, the default W4A4 GEMM impl) against the float64 emulation."""
    x, w, b, dy = _problem()
    cfg = NVFP4TrainingConfig(stochastic=False, hadamard_seed=3)
    layer = _nvfp4_layer(w, b, config=cfg).cuda()
    got = _run(layer, x.cuda(), w, b, dy.cuda())
    want = _emulate_nvfp4(x, w, b, dy, seed=11, stochastic=False, hadamard_seed=3)
    for g, r, name in zip(got, want, ("y", "dx", "dw", "db")):
        assert g.is_cuda and g.shape == r.shape, name
        assert _max_rel(g.cpu(), r) < 1e-5, (name, _max_rel(g.cpu(), r))
