"""LoRA adapters on a small random CausalWanTransformer: injection, training, merge, file round trip, quantized base."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from longstream.config import TransformerConfig
from longstream.model.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    inject_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    merge_lora_file,
    read_lora,
    remove_lora,
    save_lora,
)
from longstream.model.transformer import CausalWanTransformer
from longstream.quant import QuantLinear, quantize_model

CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, in_channels=4,
                        out_channels=4, text_dim=32, freq_dim=32)
SMALL = LoRAConfig(rank=4, alpha=8.0)
PER_BLOCK = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: threads only add contention (seconds per test on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base() -> CausalWanTransformer:
    return CausalWanTransformer(CFG).eval()


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 3, 32, generator=g))


def _randomize(model: nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.normal_(0, std)
                m.lora_B.normal_(0, std)


def _run(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_default_targets_and_zero_b_is_exactly_the_base(base, inputs):
    expected = _run(base, inputs)
    model = copy.deepcopy(base)
    names = inject_lora(model, SMALL)
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in PER_BLOCK]
    for name in names:
        m = model.get_submodule(name)
        assert isinstance(m, LoRALinear) and m.scale == 2.0
        assert m.lora_A.shape == (4, m.in_features) and m.lora_B.shape == (m.out_features, 4)
        assert m.lora_A.abs().sum() > 0 and torch.count_nonzero(m.lora_B) == 0
    # conditioning, patch embedding and output head are untouched
    for name in ("condition_embedder.time_embedder.linear_1", "condition_embedder.time_proj",
                 "condition_embedder.text_embedder.linear_2", "proj_out"):
        assert type(model.get_submodule(name)) is nn.Linear
    assert torch.equal(_run(model, inputs), expected)
    _randomize(model)
    assert _rel(_run(model, inputs), expected) > 1e-3


def test_custom_targets_and_target_errors(base):
    model = copy.deepcopy(base)
    assert inject_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("blocks.*.attn1.to_q", "blocks.1.ffn.*"))) == [
        "blocks.0.attn1.to_q", "blocks.1.attn1.to_q", "blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2"]
    assert type(model.blocks[0].attn1.to_k) is nn.Linear
    # idempotent for already wrapped layers of the same rank; another rank is refused
    assert inject_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("blocks.0.attn1.to_q",))) == [
        "blocks.0.attn1.to_q"]
    with pytest.raises(LoRAError, match="rank 2"):
        inject_lora(model, LoRAConfig(rank=3, targets=("blocks.0.attn1.to_q",)))
    for bad in (("blocks.*.attn1.to_z",), ("patch_embedding",), ("blocks.*.norm2",)):
        with pytest.raises(LoRAError, match="match no nn.Linear"):
            inject_lora(copy.deepcopy(base), LoRAConfig(targets=bad))
    with pytest.raises(LoRAError):
        LoRAConfig(rank=0)


def test_training_step_changes_only_lora_tensors(base, inputs):
    model = copy.deepcopy(base).train()
    inject_lora(model, SMALL)
    _randomize(model, 0.02)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 40
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t, text = inputs
    loss = (model(x, t, text) - torch.randn_like(x)).square().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith((".lora_A", ".lora_B")):
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k  # bitwise
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_merge_equals_unmerged_and_restores_base_names(base, inputs):
    model = copy.deepcopy(base)
    inject_lora(model, SMALL)
    _randomize(model)
    unmerged = _run(model, inputs)
    layer = model.blocks[0].attn1.to_q
    merged_w = layer.merged_weight()
    assert merged_w.dtype == torch.float32 and merged_w.shape == (32, 32)
    assert sorted(merge_lora(model)) == sorted(f"blocks.{i}.{p}" for i in range(2) for p in PER_BLOCK)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(model.blocks[0].attn1.to_q.weight, merged_w)
    assert _rel(_run(model, inputs), unmerged) < 1e-5
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in base.state_dict().items()}
    assert not torch.equal(model.blocks[1].ffn.net[2].weight, base.blocks[1].ffn.net[2].weight)


def test_remove_lora_gives_back_the_base(base, inputs):
    model = copy.deepcopy(base)
    inject_lora(model, SMALL)
    _randomize(model)
    assert len(remove_lora(model)) == 20
    assert set(model.state_dict()) == set(base.state_dict())
    assert torch.equal(_run(model, inputs), _run(base, inputs))


def test_save_load_round_trip(base, inputs, tmp_path):
    model = copy.deepcopy(base)
    inject_lora(model, SMALL)
    _randomize(model)
    expected = _run(model, inputs)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path, SMALL)
    assert not list(tmp_path.glob(".*partial"))
    state, cfg = read_lora(path)
    assert set(state) == set(lora_state_dict(model)) and cfg.rank == 4 and cfg.alpha == 8.0
    assert cfg.targets == DEFAULT_TARGETS
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["longstream_format"] == "lora/1" and json.loads(meta["targets"]) == list(DEFAULT_TARGETS)

    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path).scale == 2.0
    assert torch.equal(_run(fresh, inputs), expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(state)
    # loading into a model that already has (other) adapters of the same layers overwrites them
    again = copy.deepcopy(base)
    inject_lora(again, SMALL)
    load_lora(again, path)
    assert torch.equal(_run(again, inputs), expected)
    # a config that disagrees with the modules is refused
    with pytest.raises(LoRAError, match="rank 8"):
        save_lora(model, tmp_path / "x.safetensors", LoRAConfig(rank=8, alpha=8.0))


def test_load_errors_are_one_line_naming_the_file(base, tmp_path):
    other = CausalWanTransformer(TransformerConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                                   ffn_dim=64, in_channels=4, out_channels=4, text_dim=32,
                                                   freq_dim=32))
    inject_lora(other, SMALL)
    path = tmp_path / "other.safetensors"
    save_lora(other, path)
    model = copy.deepcopy(base)
    with pytest.raises(LoRAError) as err:
        load_lora(model, path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "wrong shape" in msg and "(4, 16) != (4, 32)" in msg
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # checked before anything changed

    deeper = CausalWanTransformer(TransformerConfig(num_attention_heads=2, attention_head_dim=16, num_layers=3,
                                                    ffn_dim=64, in_channels=4, out_channels=4, text_dim=32,
                                                    freq_dim=32))
    inject_lora(deeper, SMALL)
    save_lora(deeper, tmp_path / "deeper.safetensors")
    with pytest.raises(LoRAError, match=r"deeper\.safetensors: LoRA does not fit the model: unexpected 20: blocks\.2"):
        load_lora(copy.deepcopy(base), tmp_path / "deeper.safetensors")

    partial = copy.deepcopy(base)  # the model has adapters the file lacks
    inject_lora(partial, SMALL)
    save_lora(partial, tmp_path / "a.safetensors")
    inject_lora(partial, LoRAConfig(rank=4, alpha=8.0, targets=("proj_out",)))
    with pytest.raises(LoRAError, match="missing 2: proj_out.lora_A"):
        load_lora(partial, tmp_path / "a.safetensors")

    from longstream.model.checkpoints import save_transformer
    save_transformer(base, tmp_path / "model.safetensors")
    with pytest.raises(LoRAError, match="model.safetensors: not a longstream LoRA file"):
        load_lora(copy.deepcopy(base), tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(LoRAError, match="junk.safetensors"):
        load_lora(copy.deepcopy(base), tmp_path / "junk.safetensors")
    with pytest.raises(LoRAError, match="no such"):
        load_lora(copy.deepcopy(base), tmp_path / "absent.safetensors")


def test_merge_lora_file_matches_merge_lora(base, inputs, tmp_path):
    model = copy.deepcopy(base)
    inject_lora(model, SMALL)
    _randomize(model)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)
    base_state = base.state_dict()
    merged_state = merge_lora_file(base_state, path)
    assert set(merged_state) == set(base_state)
    assert merged_state["proj_out.weight"] is base_state["proj_out.weight"]
    merge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(merged_state[k], v), k
    with pytest.raises(LoRAError, match="lora.safetensors: LoRA does not fit the base model: missing in the base 1"):
        merge_lora_file({k: v for k, v in base_state.items() if k != "blocks.0.attn1.to_q.weight"}, path)
    small = {k: v for k, v in base_state.items()}
    small["blocks.0.ffn.net.2.weight"] = torch.zeros(32, 16)
    with pytest.raises(LoRAError, match=r"wrong shape 1: blocks\.0\.ffn\.net\.2\.weight \(32, 16\) != LoRA \(32, 64\)"):
        merge_lora_file(small, path)


def test_lora_over_nvfp4_quantlinear_trains(base, inputs, tmp_path):
    model = quantize_model(copy.deepcopy(base), "nvfp4")
    inject_lora(model, SMALL)
    assert isinstance(model.blocks[0].attn1.to_q.base, QuantLinear)
    assert model.blocks[0].attn1.to_q.base.mode == "nvfp4"
    quantized = _run(model, inputs)
    assert _rel(quantized, _run(base, inputs)) < 0.2  # W4A4 noise only: B = 0
    _randomize(model, 0.02)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, t, text = inputs
    loss = model(x, t, text).square().mean()
    loss.backward()
    for name in ("blocks.0.attn1.to_q", "blocks.0.ffn.net.2", "blocks.1.attn2.to_v"):
        m = model.get_submodule(name)
        for p in (m.lora_A, m.lora_B):  # gradients reach both factors, through the quantized layers after them
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    opt.step()
    for k, v in model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    # a saved adapter loads onto another copy of the quantized model with the same outputs
    save_lora(model, tmp_path / "q.safetensors")
    other = quantize_model(copy.deepcopy(base), "nvfp4")
    load_lora(other, tmp_path / "q.safetensors")
    assert torch.equal(_run(other, inputs), _run(model, inputs))
    with pytest.raises(LoRAError, match="quantized weights .*nvfp4.*re-quantization"):
        merge_lora(model)
    assert isinstance(model.blocks[0].attn1.to_q, LoRALinear)  # refused before anything changed


def test_lora_over_bf16_quantlinear_merges(base, inputs):
    model = quantize_model(copy.deepcopy(base), "bf16")  # float32 weights wrapped as QuantLinear
    inject_lora(model, SMALL)
    _randomize(model)
    unmerged = _run(model, inputs)
    merge_lora(model)
    assert isinstance(model.blocks[0].attn1.to_q, QuantLinear)
    assert _rel(_run(model, inputs), unmerged) < 1e-5


def test_lora_linear_alone():
    lin = nn.Linear(16, 8)
    layer = LoRALinear(lin, rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    expected = lin(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(x @ layer.merged_weight().T + lin.bias, expected, atol=1e-5)
    assert not lin.weight.requires_grad and layer.lora_A.requires_grad
    with pytest.raises(LoRAError):
        LoRALinear(nn.Conv1d(2, 2, 1), 2, 2.0)  # type: ignore[arg-type]


def test_float32_lora_over_bf16_base():
    lin = nn.Linear(16, 8).bfloat16()
    layer = LoRALinear(lin, rank=2, alpha=2.0, dtype=torch.float32)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.merged_weight().dtype == torch.bfloat16


@pytest.mark.parametrize("linear", ["bf16", "fp8"])
def test_generate_folds_a_lora_into_plain_weights_only(linear):
    """`load_models` with the shipped 2-step LoRA: with plain weights the adapter is merged (no LoRA layer left,
    q/k/v fused) and the model computes what the wrapped one does; fp8 weights keep the adapter apart."""
    from longstream.config import get_preset
    from longstream.model.checkpoints import load_transformer
    from longstream.model.fuse_qkv import has_fused_qkv
    from longstream.model.lora import LoRALinear, load_lora
    from longstream.pipeline.generate import GenerateRequest, load_models, with_embedded_weights

    req = with_embedded_weights(GenerateRequest(output="x.mp4", prompts=["a red circle bounces on a black "
                                                                         "background"], steps=2, linear=linear))
    model = load_models(req, get_preset("embedded"), torch.device("cpu")).transformer
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if linear == "fp8":
        assert wrapped and not has_fused_qkv(model)
        return
    assert not wrapped and has_fused_qkv(model)
    reference = load_transformer(req.checkpoint, dtype=torch.float32).eval()
    load_lora(reference, req.lora)
    cfg = reference.config
    torch.manual_seed(3)
    x, t = torch.randn(1, cfg.in_channels, 2, 8, 8), torch.rand(1) * 1000
    text = torch.randn(1, 5, cfg.text_dim)
    with torch.no_grad():
        want, got = reference(x, t, text, causal=False), model(x, t, text, causal=False)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
