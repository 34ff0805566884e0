"""Weights from elsewhere: diffusers folders, original Wan safetensors, LongLive generator and LoRA .pt files.

Each source is written at a tiny size from the published key names and shapes of its format; the reference model
is diffusers' `WanTransformer3DModel` loaded through diffusers' own original-Wan key conversion
(`convert_wan_transformer_to_diffusers`), so the key tables are checked against an independent implementation.
"""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from longstream.cli import CONVERT_FORMATS, main
from longstream.config import TransformerConfig, get_preset
from longstream.convert import FORMATS, convert_checkpoint, detect_format, load_checkpoint, load_diffusers_vae
from longstream.model.checkpoints import CheckpointError
from longstream.model.lora import load_lora, merge_lora
from longstream.model.transformer import CausalWanTransformer
from longstream.vae import vae_config

pytestmark = pytest.mark.usefixtures("one_thread")

# heads 2 x 16 = 32 wide: every linear is a multiple of 16, so fp8/nvfp4 quantize all of them
SHAPE = dict(heads=2, head_dim=16, layers=2, ffn=32, cin=4, cout=4, text_dim=16, freq_dim=32)
CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=32, in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def diffusers_model(heads, head_dim, layers, ffn, cin, cout, text_dim, freq_dim, seed=0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=cin,
        out_channels=cout, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    with torch.no_grad():  # diffusers starts some tables at zero; make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def original_wan_state(heads, head_dim, layers, ffn, cin, cout, text_dim, freq_dim, seed=0) -> dict:
    """A random state dict in the original Wan naming (wan/modules/model.py, t2v / ti2v models)."""
    gen = torch.Generator().manual_seed(seed)
    dim = heads * head_dim

    def t(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    state = {
        "patch_embedding.weight": t(dim, cin, 1, 2, 2), "patch_embedding.bias": t(dim),
        "text_embedding.0.weight": t(dim, text_dim), "text_embedding.0.bias": t(dim),
        "text_embedding.2.weight": t(dim, dim), "text_embedding.2.bias": t(dim),
        "time_embedding.0.weight": t(dim, freq_dim), "time_embedding.0.bias": t(dim),
        "time_embedding.2.weight": t(dim, dim), "time_embedding.2.bias": t(dim),
        "time_projection.1.weight": t(6 * dim, dim), "time_projection.1.bias": t(6 * dim),
        "head.head.weight": t(cout * 4, dim), "head.head.bias": t(cout * 4), "head.modulation": t(1, 2, dim),
    }
    for i in range(layers):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                state[f"blocks.{i}.{attn}.{proj}.weight"] = t(dim, dim)
                state[f"blocks.{i}.{attn}.{proj}.bias"] = t(dim)
            state[f"blocks.{i}.{attn}.norm_q.weight"] = 1 + t(dim)
            state[f"blocks.{i}.{attn}.norm_k.weight"] = 1 + t(dim)
        state[f"blocks.{i}.norm3.weight"] = 1 + t(dim)
        state[f"blocks.{i}.norm3.bias"] = t(dim)
        state[f"blocks.{i}.ffn.0.weight"], state[f"blocks.{i}.ffn.0.bias"] = t(ffn, dim), t(ffn)
        state[f"blocks.{i}.ffn.2.weight"], state[f"blocks.{i}.ffn.2.bias"] = t(dim, ffn), t(dim)
        state[f"blocks.{i}.modulation"] = t(1, 6, dim)
    return state


def reference_from_original(state: dict, shape=SHAPE) -> WanTransformer3DModel:
    """diffusers' model with the original-named weights, renamed by diffusers' own converter."""
    model = diffusers_model(**shape)
    model.load_state_dict(convert_wan_transformer_to_diffusers({k: v.float() for k, v in state.items()}),
                          strict=True)
    return model


def inputs(config: TransformerConfig = CFG, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, 3, 4, 4, generator=gen)
    return x, torch.tensor([700.0]), torch.randn(1, 5, config.text_dim, generator=gen)


def assert_same_model(model: CausalWanTransformer, reference: WanTransformer3DModel) -> None:
    """Same weights as `reference` (bitwise), the same output as loading them directly, and diffusers' output."""
    ours = model.state_dict()
    for k, v in reference.state_dict().items():
        assert torch.equal(ours[k].float(), v), k
    direct = CausalWanTransformer.from_diffusers(reference).eval()
    x, t, e = inputs(model.config)
    with torch.no_grad():
        got = model.float().eval()(x, t, e)
        assert rel(got, direct(x, t, e)) < 1e-6
        assert rel(got, reference(x, t, e).sample) < 1e-6


# -- diffusers ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    model = diffusers_model(**SHAPE)
    folder = tmp_path_factory.mktemp("wan-diffusers") / "transformer"
    model.save_pretrained(folder)
    return model, folder


def test_cli_converts_a_diffusers_folder(diffusers_dir, tmp_path, capsys):
    reference, folder = diffusers_dir
    out = tmp_path / "wan.safetensors"
    assert main(["convert", str(folder), str(out)]) == 0
    assert "from diffusers" in capsys.readouterr().out
    model = CausalWanTransformer.from_checkpoint(out)
    assert model.config.num_attention_heads == 2 and model.config.num_layers == 2
    assert_same_model(model, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan.safetensors"]


def test_sharded_pipeline_folder(tmp_path):
    reference = diffusers_model(**SHAPE)
    root = tmp_path / "Wan-Diffusers"
    reference.save_pretrained(root / "transformer", max_shard_size="20KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert len(list((root / "transformer").glob("*.safetensors"))) > 2
    assert detect_format(root) == "diffusers"
    assert_same_model(load_checkpoint(root), reference)


def test_missing_shard_names_the_shard(tmp_path):
    diffusers_model(**SHAPE).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: no such checkpoint file"):
        load_checkpoint(tmp_path)


def test_single_diffusers_file(diffusers_dir, tmp_path):
    reference, _ = diffusers_dir
    path = tmp_path / "diffusers_named.safetensors"
    save_file(reference.state_dict(), str(path))
    assert detect_format(path) == "diffusers"
    with pytest.raises(CheckpointError, match="cannot tell the number of attention heads of a 32-wide model"):
        load_checkpoint(path)  # no config.json, and 32 wide fits neither a preset nor Wan's 128-wide heads
    assert_same_model(load_checkpoint(path, expected=CFG), reference)


def test_unsupported_diffusers_options(diffusers_dir, tmp_path):
    _, folder = diffusers_dir
    copy = tmp_path / "i2v"
    copy.mkdir()
    (copy / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "image_dim": 1280}))
    with pytest.raises(CheckpointError, match="unsupported WanTransformer3DModel options: image_dim"):
        load_checkpoint(copy)


# -- original Wan --------------------------------------------------------------------------------------------------
def test_original_wan_file(tmp_path):
    state = original_wan_state(**SHAPE)
    src = tmp_path / "wan.safetensors"
    save_file(state, str(src))
    assert detect_format(src) == "wan"
    out = tmp_path / "out.safetensors"
    # 32 wide is no preset and not a multiple of Wan's 128-wide heads: the heads must be named
    with pytest.raises(CheckpointError, match="cannot tell the number of attention heads"):
        convert_checkpoint(src, out)
    assert convert_checkpoint(src, out, expected=CFG) == "wan"
    assert_same_model(CausalWanTransformer.from_checkpoint(out), reference_from_original(state))


def test_original_wan_folder_with_prefix_and_config(tmp_path):
    """A sharded folder (Wan2.2-TI2V-5B layout) whose config.json gives num_heads; ComfyUI-style key prefix."""
    state = original_wan_state(**SHAPE)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    keys = sorted(prefixed)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, names in enumerate(halves):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: prefixed[k] for k in names}, str(tmp_path / name))
        weight_map.update({k: name for k in names})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": 2, "dim": 32}))
    assert detect_format(tmp_path) == "wan"
    assert_same_model(load_checkpoint(tmp_path), reference_from_original(state))


def test_strict_keys_listed_in_one_line(tmp_path):
    state = original_wan_state(**SHAPE)
    del state["blocks.1.ffn.2.bias"]
    state["blocks.0.cross_attn.k_img.weight"] = torch.zeros(32, 32)  # an I2V-only layer
    state["blocks.0.self_attn.q.weight"] = torch.zeros(32, 31)
    src = tmp_path / "bad.safetensors"
    save_file(state, str(src))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(src, expected=CFG)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{src}: does not fit the model")
    assert "missing 1: blocks.1.ffn.2.bias" in msg
    assert "unexpected 1: blocks.0.cross_attn.k_img.weight" in msg
    assert "wrong shape 1: blocks.0.self_attn.q.weight (32, 31) != (32, 32)" in msg


# -- LongLive ------------------------------------------------------------------------------------------------------
def _longlive_pt(path, seed=0, dtype=torch.bfloat16):
    gen, ema = original_wan_state(**SHAPE, seed=seed), original_wan_state(**SHAPE, seed=seed + 100)
    torch.save({
        "generator": {f"model.{k}": v.to(dtype) for k, v in gen.items()},
        "generator_ema": {f"model.{k}": v.to(dtype) for k, v in ema.items()},
        "critic": {"model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)},
    }, path)
    return gen, ema


@pytest.mark.parametrize("ema", [False, True])
def test_longlive_generator(tmp_path, ema):
    src = tmp_path / "longlive_base.pt"
    gen, ema_state = _longlive_pt(src)
    assert detect_format(src) == "longlive"
    out = tmp_path / "out.safetensors"
    code = main(["convert", str(src), str(out), "--preset", "tiny"])
    assert code == 2  # the tiny preset is another model
    assert not out.exists()
    convert_checkpoint(src, out, expected=CFG, ema=ema)
    model = CausalWanTransformer.from_checkpoint(out)
    assert model.dtype == torch.bfloat16  # kept as stored
    chosen = ema_state if ema else gen
    assert_same_model(model, reference_from_original({k: v.bfloat16() for k, v in chosen.items()}))


def test_longlive_tiny_preset_shape_needs_no_preset(tmp_path):
    """A LongLive file of a preset's shape converts without naming it (the heads come from the preset)."""
    tiny = get_preset("tiny").transformer
    shape = dict(heads=tiny.num_attention_heads, head_dim=tiny.attention_head_dim, layers=tiny.num_layers,
                 ffn=tiny.ffn_dim, cin=tiny.in_channels, cout=tiny.out_channels, text_dim=tiny.text_dim,
                 freq_dim=tiny.freq_dim)
    state = original_wan_state(**shape)
    src = tmp_path / "tiny.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, src)
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(src), str(out), "--dtype", "fp32"]) == 0
    model = load_checkpoint(out, expected=tiny)
    assert model.config == tiny
    assert_same_model(model, reference_from_original(state, shape))


def _lora_pt(path, rank=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    dim, ffn = 32, 32
    shapes = {**{f"{a}.{p}": (dim, dim) for a in ("self_attn", "cross_attn") for p in "qkvo"},
              "ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    lora = {}
    for i in range(SHAPE["layers"]):
        for module, (out_f, in_f) in shapes.items():
            lora[f"base_model.model.blocks.{i}.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.1
            lora[f"base_model.model.blocks.{i}.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.1
    torch.save({"generator_lora": lora}, path)
    return lora


def test_longlive_lora(tmp_path):
    base_src, lora_src = tmp_path / "base.pt", tmp_path / "lora.pt"
    gen, _ = _longlive_pt(base_src, dtype=torch.float32)
    lora = _lora_pt(lora_src)
    assert detect_format(lora_src) == "longlive-lora"
    base, adapter = tmp_path / "base.safetensors", tmp_path / "lora.safetensors"
    convert_checkpoint(base_src, base, expected=CFG)
    assert main(["convert", str(lora_src), str(adapter), "--lora-alpha", "8", "--dtype", "fp32"]) == 0

    # reference: the LoRA merged in the original naming (W + alpha/rank * B @ A), renamed by diffusers
    merged = dict(gen)
    for key in [k for k in lora if k.endswith("lora_A.weight")]:
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        delta = (lora[key.replace("lora_A", "lora_B")].float() @ lora[key].float()) * (8 / 4)
        merged[f"{module}.weight"] = (gen[f"{module}.weight"].float() + delta)
    reference = reference_from_original(merged)

    model = CausalWanTransformer.from_checkpoint(base).eval()
    config = load_lora(model, adapter)
    assert (config.rank, config.alpha) == (4, 8.0)
    x, t, e = inputs()
    with torch.no_grad():
        unmerged = model(x, t, e)
        assert rel(unmerged, reference(x, t, e).sample) < 1e-6
    merge_lora(model)
    assert_same_model(model, reference)


def test_lora_problems_are_one_line(tmp_path):
    src = tmp_path / "lora.pt"
    lora = _lora_pt(src)
    lora["base_model.model.blocks.0.cross_attn.k_img.lora_A.weight"] = torch.zeros(4, 32)
    torch.save({"generator_lora": lora}, src)
    out = tmp_path / "lora.safetensors"
    with pytest.raises(CheckpointError, match=r"unexpected 1 LoRA tensors: .*cross_attn\.k_img\.lora_A\.weight"):
        convert_checkpoint(src, out)
    del lora["base_model.model.blocks.0.cross_attn.k_img.lora_A.weight"]
    torch.save(lora, src)  # a bare state dict is accepted too
    with pytest.raises(CheckpointError, match=r"LoRA does not fit the model: blocks\.0\.attn1\.to_k \(32, 32\) != "
                                              r"\(96, 96\); .* \(\+17 more\)$"):
        convert_checkpoint(src, out, expected=get_preset("tiny").transformer)
    assert not out.exists()
    with pytest.raises(CheckpointError, match="a LoRA, not a transformer checkpoint"):
        load_checkpoint(src)


# -- pre-quantized output ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fp8", "nvfp4"])
def test_convert_quantized(diffusers_dir, tmp_path, mode):
    from longstream.quant import QuantLinear, quantize_model

    reference, folder = diffusers_dir
    out = tmp_path / f"{mode}.safetensors"
    assert main(["convert", str(folder), str(out), "--quantize", mode]) == 0
    model = load_checkpoint(out).eval()
    assert {m.mode for m in model.modules() if isinstance(m, QuantLinear)} == {mode}
    direct = quantize_model(CausalWanTransformer.from_diffusers(reference).eval(), mode)
    x, t, e = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, e), direct(x, t, e))


# -- generate ------------------------------------------------------------------------------------------------------
def _tiny_diffusers_dir(path):
    tiny = get_preset("tiny").transformer
    model = diffusers_model(tiny.num_attention_heads, tiny.attention_head_dim, tiny.num_layers, tiny.ffn_dim,
                            tiny.in_channels, tiny.out_channels, tiny.text_dim, tiny.freq_dim)
    model.save_pretrained(path)
    return path


def test_generate_takes_a_diffusers_folder(tmp_path):
    from longstream.pipeline.video_io import read_video_info

    folder = _tiny_diffusers_dir(tmp_path / "tiny-diffusers")
    out = tmp_path / "v.mp4"
    assert main(["generate", "--preset", "tiny", "--checkpoint", str(folder), "--prompt", "a red ball",
                 "--seconds", "0.5", "--width", "32", "--height", "32", "--quiet", "-o", str(out)]) == 0
    assert read_video_info(out)[1:3] == (32, 32)


def test_generate_rejects_a_mismatched_quantization(tmp_path, capsys):
    folder = _tiny_diffusers_dir(tmp_path / "tiny-diffusers")
    ckpt = tmp_path / "tiny-fp8.safetensors"
    assert main(["convert", str(folder), str(ckpt), "--quantize", "fp8"]) == 0
    out = tmp_path / "v.mp4"
    capsys.readouterr()
    assert main(["generate", "--preset", "tiny", "--checkpoint", str(ckpt), "--prompt", "x", "--seconds", "0.5",
                 "--width", "32", "--height", "32", "--quiet", "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"longstream: error: {ckpt} holds fp8 weights; pass --linear fp8"
    assert not out.exists()


# -- one clear line for every bad input ----------------------------------------------------------------------------
def _truncated_safetensors(p):
    save_file(original_wan_state(**SHAPE), str(p / "cut.safetensors"))
    data = (p / "cut.safetensors").read_bytes()
    (p / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return p / "cut.safetensors", "not a readable safetensors checkpoint"


def _truncated_pt(p):
    _longlive_pt(p / "cut.pt")
    data = (p / "cut.pt").read_bytes()
    (p / "cut.pt").write_bytes(data[: len(data) // 2])
    return p / "cut.pt", "not a PyTorch checkpoint"


def _text_file(p):
    (p / "notes.safetensors").write_text("hello, not a checkpoint")
    return p / "notes.safetensors", "not a readable safetensors checkpoint"


def _other_safetensors(p):
    save_file({"encoder.weight": torch.zeros(2)}, str(p / "other.safetensors"))
    return p / "other.safetensors", "not a Wan transformer"


def _empty_folder(p):
    (p / "empty").mkdir()
    return p / "empty", "no safetensors file"


def _pickle_with_code(p):
    import collections

    torch.save({"generator": collections.OrderedDict(a=torch.zeros(1)), "config": _Opaque()}, p / "code.pt")
    return p / "code.pt", "not a readable PyTorch checkpoint"


class _Opaque:
    pass


def _wrong_preset(p):
    return _tiny_diffusers_dir(p / "tiny-diffusers"), "checkpoint is for another model: num_attention_heads=4 but " \
                                                      "the preset has 24"


@pytest.mark.parametrize("make", [_truncated_safetensors, _truncated_pt, _text_file, _other_safetensors, _empty_folder,
                                  _pickle_with_code, _wrong_preset])
def test_bad_sources_fail_in_one_line(tmp_path, capsys, make):
    src, problem = make(tmp_path)
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(src), str(out), "--preset", "wan2.2-ti2v-5b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"longstream: error: {src}")
    assert problem in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temporary file


def test_output_must_be_safetensors(diffusers_dir, tmp_path, capsys):
    _, folder = diffusers_dir
    assert main(["convert", str(folder), str(tmp_path / "out.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_cli_formats_are_the_library_formats():
    assert CONVERT_FORMATS == FORMATS


# -- VAE -----------------------------------------------------------------------------------------------------------
def test_diffusers_vae_folder(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**vae_config("test-wan2.1")).eval()
    root = tmp_path / "pipeline"
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text("{}")
    loaded = load_diffusers_vae(root)
    z = torch.randn(1, 16, 2, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="config.json is for a AutoencoderKL, not a AutoencoderKLWan"):
        load_diffusers_vae(root)
