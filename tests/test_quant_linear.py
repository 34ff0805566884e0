"""QuantLinear (bf16 | fp8 | nvfp4), quantize_model on a small CausalWanTransformer, save/load of quantized weights.

Measured on CPU (torch 2.13, seed 0): relative error ||y - y_float|| / ||y_float|| of one layer on Gaussian data
(x [256, 512], W [384, 512]): fp8 0.036 (E4M3 has 3 mantissa bits: RMS rounding error ~2.5% per operand),
nvfp4 0.139. Tiny transformer output vs float: fp8 0.010, nvfp4 0.042.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

from longstream.config import TransformerConfig
from longstream.errors import LongstreamError
from longstream.model.transformer import CausalWanTransformer
from longstream.quant import (DEFAULT_SKIP, QuantError, QuantFileError, QuantLinear, load_quantized, quant_summary,
                              quantize_model, save_quantized)
from longstream.quant import fp8
from longstream.quant import nvfp4 as nv

KEPT = [  # the conditioning and output projections that stay high precision
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "proj_out",
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _linear(k=512, n=384, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


# ---------------------------------------------------------------- one layer


def test_bf16_mode_is_nn_linear_exactly():
    lin = _linear(64, 48)
    q = QuantLinear.from_linear(lin, "bf16")
    x = torch.randn(2, 5, 64)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert torch.equal(q(x), lin(x))


def test_fp8_mode_equals_float64_math_on_quantized_operands():
    lin = _linear()
    q = QuantLinear.from_linear(lin, "fp8")
    assert not hasattr(q, "weight")  # the high-precision weight is dropped
    assert q.qdata.dtype == torch.float8_e4m3fn and q.qdata.shape == (384, 512)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (384, 1)
    x = torch.randn(2, 128, 512)
    with torch.no_grad():
        y = q(x)
        y_float = lin(x)
    xq, xs = fp8.quantize_rowwise(x.reshape(-1, 512))
    wq, ws = fp8.quantize_rowwise(lin.weight.detach())
    ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t() + lin.bias.double()
    assert y.shape == (2, 128, 384) and y.dtype == torch.float32
    assert _max_rel(y.reshape(-1, 384), ref) < 1e-5
    err = _rel(y, y_float)
    assert 0.01 < err < 0.05, err  # measured 0.036


def test_nvfp4_mode_equals_float64_math_on_quantized_operands():
    lin = _linear()
    q = QuantLinear.from_linear(lin, "nvfp4")
    assert not hasattr(q, "weight")
    assert q.qdata.dtype == torch.uint8 and q.qdata.shape == (384, 256)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (384, 32)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.dim() == 0
    x = torch.randn(2, 128, 512)
    with torch.no_grad():
        y = q(x)
        y_float = lin(x)
    xd = nv.quantize(x.reshape(-1, 512)).dequantize(torch.float64)
    wd = nv.quantize(lin.weight.detach()).dequantize(torch.float64)
    ref = xd @ wd.t() + lin.bias.double()
    assert _max_rel(y.reshape(-1, 384), ref) < 1e-5
    err = _rel(y, y_float)
    assert 0.05 < err < 0.15, err  # measured 0.139


def test_leading_dims_bf16_input_and_no_bias():
    lin = _linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 3, 4, 64, dtype=torch.bfloat16)
    for mode in ("fp8", "nvfp4"):
        q = QuantLinear.from_linear(lin, mode)
        with torch.no_grad():
            y = q(x)
        assert y.shape == (2, 3, 4, 32) and y.dtype == torch.bfloat16
        x2 = x.reshape(-1, 64)
        if mode == "fp8":
            xd = fp8.dequantize(*fp8.quantize_rowwise(x2), torch.float64)
        else:
            xd = nv.quantize(x2).dequantize(torch.float64)
        ref = (xd @ q.dequantized_weight(torch.float64).t()).reshape(2, 3, 4, 32)
        assert _max_rel(y, ref) < 1e-2  # bf16 output rounding


def test_to_dtype_keeps_the_format_buffers():
    q = QuantLinear.from_linear(_linear(64, 32), "nvfp4")
    scale_bits = q.scale.view(torch.uint8).clone()
    g = q.global_scale.clone()
    q = q.to(torch.bfloat16)
    assert q.qdata.dtype == torch.uint8 and q.scale.dtype == torch.float8_e4m3fn
    assert q.global_scale.dtype == torch.float32 and torch.equal(q.global_scale, g)
    assert torch.equal(q.scale.view(torch.uint8), scale_bits)
    assert q.bias.dtype == torch.bfloat16
    f = QuantLinear.from_linear(_linear(64, 32), "fp8").half()
    assert f.qdata.dtype == torch.float8_e4m3fn and f.scale.dtype == torch.float32


def test_straight_through_gradient_to_the_input():
    q = QuantLinear.from_linear(_linear(64, 32), "nvfp4")
    x = torch.randn(5, 64, requires_grad=True)
    dy = torch.randn(5, 32)
    q(x).backward(dy)
    torch.testing.assert_close(x.grad, dy @ q.dequantized_weight())


def test_unknown_mode_and_bad_shape_errors():
    with pytest.raises(QuantError, match="unknown quantization mode 'int8'.*bf16, fp8, nvfp4"):
        quantize_model(nn.Sequential(nn.Linear(16, 16)), "int8")
    with pytest.raises(LongstreamError, match="multiple of 16"):
        QuantLinear.from_linear(nn.Linear(24, 16), "nvfp4")


# ---------------------------------------------------------------- whole model


def _tiny_model():
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32)
    return CausalWanTransformer(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 32, generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = _tiny_model()
    with torch.no_grad():
        ref = model(*_inputs())
    return model, ref


@pytest.mark.parametrize("mode,tol", [("bf16", 0.0), ("fp8", 0.03), ("nvfp4", 0.1)])
def test_quantize_model_honors_skip_and_stays_close(tiny, mode, tol):
    model, ref = tiny
    q = quantize_model(copy.deepcopy(model), mode)
    s = quant_summary(q)
    assert sorted(s.kept) == sorted(KEPT)
    assert len(s.quantized) == 2 * 10 and set(s.quantized.values()) == {mode}  # 10 linears per block
    assert all(n.startswith("blocks.") for n in s.quantized)
    assert s.counts() == {mode: 20, "kept": 6}
    with torch.no_grad():
        y = q(*_inputs())
    err = _rel(y, ref)
    assert err <= tol, err  # measured: fp8 0.010, nvfp4 0.042
    assert "proj_out" in DEFAULT_SKIP and "condition_embedder.*" in DEFAULT_SKIP


def test_quantize_model_custom_skip(tiny):
    q = quantize_model(copy.deepcopy(tiny[0]), "nvfp4", skip=(*DEFAULT_SKIP, "blocks.0"))
    s = quant_summary(q)
    assert len(s.quantized) == 10 and all(n.startswith("blocks.1.") for n in s.quantized)
    assert "blocks.0.attn1.to_q" in s.kept and "blocks.0.ffn.net.2" in s.kept


@pytest.mark.parametrize("mode", ["fp8", "nvfp4"])
def test_save_load_roundtrip_is_bit_identical(tiny, tmp_path, mode):
    from safetensors import safe_open

    q = quantize_model(copy.deepcopy(tiny[0]), mode)
    path = tmp_path / f"{mode}.safetensors"
    save_quantized(q, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        qdata = f.get_tensor("blocks.0.attn1.to_q.qdata")
        scale = f.get_tensor("blocks.0.attn1.to_q.scale")
        if mode == "nvfp4":
            assert f.get_tensor("blocks.0.attn1.to_q.global_scale").dtype == torch.float32
        assert "proj_out.weight" in f.keys() and "blocks.0.attn1.to_q.weight" not in f.keys()
    assert meta["longstream_format"] == "quantized/1" and meta["mode"] == mode
    assert json.loads(meta["layers"])["blocks.1.ffn.net.2"] == mode
    assert qdata.dtype == torch.uint8 and qdata.shape == ((32, 16) if mode == "nvfp4" else (32, 32))
    assert scale.dtype == (torch.uint8 if mode == "nvfp4" else torch.float32)

    torch.manual_seed(123)  # a skeleton with other random weights: everything must come from the file
    loaded = load_quantized(_tiny_model(), path)
    assert quant_summary(loaded).quantized == quant_summary(q).quantized
    with torch.no_grad():
        assert torch.equal(loaded(*_inputs()), q(*_inputs()))


def test_nvfp4_file_is_about_3_5x_smaller_than_bf16(tiny, tmp_path):
    from safetensors import safe_open

    # weights only: two 512x512 layers without bias, so the file header is negligible
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False)).to(torch.bfloat16)
    save_quantized(quantize_model(copy.deepcopy(model), "bf16"), tmp_path / "bf16.safetensors")
    save_quantized(quantize_model(copy.deepcopy(model), "nvfp4"), tmp_path / "nvfp4.safetensors")
    ratio = (tmp_path / "bf16.safetensors").stat().st_size / (tmp_path / "nvfp4.safetensors").stat().st_size
    assert 3.4 < ratio < 3.6, ratio  # 32 bytes per 16 weights vs 8 + 1: 3.56

    # the tiny transformer: bytes of the quantized layers' weights in the file vs their bf16 size
    path = tmp_path / "tiny.safetensors"
    q = quantize_model(copy.deepcopy(tiny[0]), "nvfp4")
    save_quantized(q, path)
    with safe_open(str(path), framework="pt") as f:
        packed = sum(f.get_tensor(f"{n}.{part}").nbytes for n in quant_summary(q).quantized
                     for part in ("qdata", "scale", "global_scale"))
    bf16 = sum(m.in_features * m.out_features * 2 for _, m in q.named_modules() if isinstance(m, QuantLinear))
    assert 3.4 < bf16 / packed < 3.6, bf16 / packed


def test_load_errors_are_one_line_and_name_the_file(tiny, tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(QuantFileError, match="nope.safetensors: no such"):
        load_quantized(_tiny_model(), missing)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(QuantFileError, match="junk.safetensors: not a readable") as e:
        load_quantized(_tiny_model(), junk)
    assert "\n" not in str(e.value)

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(QuantFileError, match="plain.safetensors: not a longstream quantized"):
        load_quantized(_tiny_model(), plain)

    good = tmp_path / "good.safetensors"
    save_quantized(quantize_model(copy.deepcopy(tiny[0]), "nvfp4"), good)
    other = CausalWanTransformer(TransformerConfig(num_attention_heads=2, attention_head_dim=32, num_layers=2,
                                                   ffn_dim=64, in_channels=4, out_channels=4, text_dim=32,
                                                   freq_dim=32))
    with pytest.raises(QuantFileError, match="good.safetensors: does not fit the model: .*shape") as e:
        load_quantized(other, good)
    assert "\n" not in str(e.value)
    with pytest.raises(QuantFileError, match="good.safetensors: quantized layer 'blocks.0.attn1.to_q' is not"):
        load_quantized(nn.Sequential(nn.Linear(16, 16)), good)


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_concatenated_layers_equal_the_layers_side_by_side(mode):
    torch.manual_seed(11)
    layers = [QuantLinear.from_linear(nn.Linear(64, n), mode) for n in (32, 48, 32)]
    joint = QuantLinear.concatenated(layers)
    x = torch.randn(5, 64) * 3
    with torch.no_grad():
        expected = torch.cat([m(x) for m in layers], dim=-1)
        got = joint(x)
    assert joint.out_features == 112 and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_nvfp4_and_mixed_layers_are_not_concatenated():
    torch.manual_seed(12)
    with pytest.raises(QuantError, match="global scale"):
        QuantLinear.concatenated([QuantLinear.from_linear(nn.Linear(32, 16), "nvfp4") for _ in range(2)])
    with pytest.raises(QuantError, match="one mode"):
        QuantLinear.concatenated([QuantLinear.from_linear(nn.Linear(32, 16), m) for m in ("fp8", "bf16")])


@pytest.mark.gpu
def test_nvfp4_mode_on_the_gpu_equals_float64_math():
    """On CUDA the layer runs the Triton quantize-and-decode and the decoded GEMM (backend.nvfp4_linear)."""
    lin = _linear()
    q = QuantLinear.from_linear(lin, "nvfp4").cuda()
    x = torch.randn(2, 128, 512)
    with torch.no_grad():
        y = q(x.cuda())
        yb = q(x.cuda().bfloat16())
    wd = nv.quantize(lin.weight.detach()).dequantize(torch.float64)
    for got, inp, tol in ((y, x, 1e-5), (yb, x.bfloat16(), 8e-3)):
        ref = nv.quantize(inp.reshape(-1, 512)).dequantize(torch.float64) @ wd.t() + q.bias.detach().cpu().double()
        assert got.is_cuda and got.dtype == inp.dtype
        assert _max_rel(got.cpu().reshape(-1, 384), ref) < tol
