"""Transformer checkpoints: round trip, and one clear error for every kind of bad file."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from longstream.config import TransformerConfig
from longstream.model.checkpoints import CheckpointError, load_transformer, save_transformer
from longstream.model.transformer import CausalWanTransformer

CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=32, in_channels=4,
                        out_channels=4, text_dim=8, freq_dim=32)


@pytest.fixture
def saved(tmp_path):
    model = CausalWanTransformer(CFG).eval()
    path = tmp_path / "m.safetensors"
    save_transformer(model, path)
    return model, path


def test_round_trip(saved):
    model, path = saved
    loaded = CausalWanTransformer.from_checkpoint(path).eval()
    assert loaded.config == CFG
    x, t, e = torch.randn(1, 4, 2, 4, 4), torch.rand(1) * 1000, torch.randn(1, 3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, e), model(x, t, e))
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left


def test_wrong_preset(saved):
    _, path = saved
    other = dataclasses.replace(CFG, num_layers=3)
    with pytest.raises(CheckpointError, match=r"m.safetensors: checkpoint is for another model: num_layers=2"):
        load_transformer(path, expected=other)


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_transformer(path)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint", b"", bytes(range(256)) * 10])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"x.safetensors: not a readable"):
        load_transformer(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_transformer(tmp_path / "none.safetensors")


def test_wrong_keys_and_shapes_listed_together(tmp_path):
    state = CausalWanTransformer(CFG).state_dict()
    state.pop("proj_out.bias")
    state["extra.weight"] = torch.zeros(2)
    state["blocks.0.attn1.to_q.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_transformer(path, expected=CFG)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing 1: proj_out.bias" in msg and "unexpected 1: extra.weight" in msg
    assert "wrong shape 1: blocks.0.attn1.to_q.weight (3, 3) != (24, 24)" in msg


def test_no_config_needs_a_preset(tmp_path):
    path = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in CausalWanTransformer(CFG).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no config"):
        load_transformer(path)
    assert load_transformer(path, expected=CFG).config == CFG


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(tmp_path, bad):
    """A NaN or Inf weight would render a black video with exit status 0: loading names the tensor instead."""
    model = CausalWanTransformer(CFG)
    with torch.no_grad():
        name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("blocks.1.") and p.dim() == 2)
        param.view(-1)[torch.randint(param.numel(), (1,))] = bad
    path = tmp_path / "m.safetensors"
    save_transformer(model, path)
    with pytest.raises(CheckpointError, match=rf"m.safetensors: NaN or infinite weights in {name}$"):
        load_transformer(path)


def test_saved_files_get_the_usual_mode(saved):
    """Other users may read a checkpoint as with any new file (umask applied); safetensors alone writes 0600."""
    import os

    _, path = saved
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
