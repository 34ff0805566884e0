"""CausalWanTransformer against diffusers' WanTransformer3DModel (same weights, fp32)."""

import pytest
import torch

from longstream.model.attention import (
    FrameMaskAttention, attention, block_causal_mask, expand_frame_mask, teacher_forcing_mask,
)
from longstream.model.rope import rope_cos_sin
from longstream.model.transformer import CausalWanTransformer
from longstream.parallel import BalancedLayout

diffusers = pytest.importorskip("diffusers")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_diffusers(heads: int, head_dim: int, layers: int, cin: int, cout: int, text_dim: int, ffn: int):
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=cin,
        out_channels=cout, text_dim=text_dim, freq_dim=64, ffn_dim=ffn, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than default init so that every path matters
            p.normal_(0.0, 0.2)
    return model


CONFIGS = [
    # odd head count, non-square latent, in != out channels
    dict(heads=3, head_dim=12, layers=2, cin=5, cout=7, text_dim=20, ffn=40, latent=(3, 6, 10)),
    # 5 heads of 18 (RoPE split 6/6/6), Wan2.2-like 48 channels, tall latent
    dict(heads=5, head_dim=18, layers=3, cin=48, cout=48, text_dim=24, ffn=64, latent=(4, 10, 4)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_diffusers(cfg):
    ref_model = random_diffusers(**{k: v for k, v in cfg.items() if k != "latent"})
    model = CausalWanTransformer.from_diffusers(ref_model).eval()
    x = torch.randn(2, cfg["cin"], *cfg["latent"])
    t = torch.rand(2) * 1000
    text = torch.randn(2, 9, cfg["text_dim"])
    with torch.no_grad():
        expected = ref_model(x, t, text).sample
        got = model(x, t, text, causal=False)
    assert got.shape == expected.shape
    assert rel(got, expected) < 1e-5


def test_per_frame_timesteps_match_diffusers_per_token():
    cfg = CONFIGS[0]
    ref_model = random_diffusers(**{k: v for k, v in cfg.items() if k != "latent"})
    model = CausalWanTransformer.from_diffusers(ref_model).eval()
    f, h, w = cfg["latent"]
    x = torch.randn(1, cfg["cin"], f, h, w)
    t_frames = torch.rand(1, f) * 1000
    t_tokens = t_frames.repeat_interleave((h // 2) * (w // 2), dim=1)
    text = torch.randn(1, 5, cfg["text_dim"])
    with torch.no_grad():
        expected = ref_model(x, t_tokens, text).sample
        assert rel(model(x, t_frames, text), expected) < 1e-5
        assert rel(model(x, t_tokens, text), expected) < 1e-5


def test_state_dict_is_diffusers_compatible():
    ref_model = random_diffusers(heads=2, head_dim=12, layers=1, cin=4, cout=4, text_dim=8, ffn=16)
    model = CausalWanTransformer.from_diffusers(ref_model)
    assert set(model.state_dict()) == set(ref_model.state_dict())
    ref_model.load_state_dict(model.state_dict(), strict=True)


def test_block_causal_forward_ignores_the_future():
    """Under the block-causal mask, chunk c's output does not change when later chunks change, and with one
    layer it equals a bidirectional run on chunks 0..c alone."""
    for layers in (1, 3):
        ref_model = random_diffusers(heads=3, head_dim=12, layers=layers, cin=4, cout=4, text_dim=8, ffn=24)
        model = CausalWanTransformer.from_diffusers(ref_model).eval()
        x = torch.randn(1, 4, 6, 4, 4)
        t = torch.rand(1, 6) * 1000
        text = torch.randn(1, 3, 8)
        with torch.no_grad():
            causal = model(x, t, text, causal=True, chunk_frames=2)
            for c in range(3):
                end = 2 * (c + 1)
                changed = x.clone()
                changed[:, :, end:] = torch.randn_like(changed[:, :, end:])
                again = model(changed, t, text, causal=True, chunk_frames=2)
                assert rel(again[:, :, :end], causal[:, :, :end]) < 1e-6
                if end < 6:
                    assert rel(again[:, :, end:], causal[:, :, end:]) > 1e-2
                if layers == 1:
                    prefix = model(x[:, :, :end], t[:, :end], text, causal=False)
                    assert rel(causal[:, :, end - 2 : end], prefix[:, :, end - 2 :]) < 1e-5


def test_masks():
    m = block_causal_mask(torch.tensor([0, 0, 1, 1, 2]))
    assert m[1].tolist() == [True, True, False, False, False]
    assert m[4].tolist() == [True] * 5
    tf = teacher_forcing_mask(4, 2)  # clean 0..3 then noisy 0..3
    assert tf[4].tolist() == [False] * 4 + [True, True, False, False]  # noisy frame 0: own noisy chunk only
    assert tf[6].tolist() == [True, True, False, False, False, False, True, True]
    assert tf[2].tolist() == [True] * 4 + [False] * 4
    assert expand_frame_mask(torch.tensor([[True, False]]), 3).shape == (3, 6)


def test_rope_never_runs_out_and_matches_diffusers_table():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim = 24
    table = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    cos_ref, sin_ref = table(torch.zeros(1, 1, 5, 6, 8))  # 5 frames of 3x4 tokens
    cos, sin = rope_cos_sin(torch.arange(5), 3, 4, head_dim)
    assert torch.equal(cos, cos_ref[0, :, 0, 0::2]) and torch.equal(sin, sin_ref[0, :, 0, 1::2])
    # far beyond any table: 10 minutes of 24 fps video is 3600 latent frames; exact float64 math
    pos = torch.tensor([36000.5, 36001.5])
    cos, sin = rope_cos_sin(pos, 1, 1, head_dim)
    t_dim = head_dim - 2 * 2 * (head_dim // 6)
    inv = 1.0 / (10000.0 ** (torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim))
    expected = torch.cos(pos.double()[:, None] * inv).float()
    assert torch.equal(cos[:, : t_dim // 2], expected)


def test_bad_input_shapes_are_rejected():
    model = CausalWanTransformer.from_diffusers(
        random_diffusers(heads=2, head_dim=12, layers=1, cin=4, cout=4, text_dim=8, ffn=16)
    )
    text = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.randn(1, 3, 2, 4, 4), torch.zeros(1), text)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 4, 2, 5, 4), torch.zeros(1), text)
    with pytest.raises(ValueError, match="chunk_frames"):
        model(torch.randn(1, 4, 2, 4, 4), torch.zeros(1), text, causal=True)


@pytest.mark.parametrize("mask", [
    teacher_forcing_mask(6, 2),
    block_causal_mask(torch.arange(5) // 2),
    BalancedLayout(8, 2, 2).frame_mask(),  # exchange order of Balanced SP
])
def test_frame_mask_attention_equals_the_token_mask(mask):
    """Grouped SDPA over the key frames of each distinct mask row equals SDPA with the expanded token mask
    (float64, random inputs)."""
    tpf = 3
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, mask.shape[0] * tpf, 8, dtype=torch.float64, generator=g) for _ in range(3))
    want = attention(q, k, v, expand_frame_mask(mask, tpf))
    attend = FrameMaskAttention(mask, tpf)
    assert len(attend.groups) == len(torch.unique(mask, dim=0)) < mask.shape[0]
    assert (attend(0, q, k, v) - want).abs().max() < 1e-12
    with pytest.raises(ValueError, match="query and"):
        attend(0, q[:, :, :-tpf], k, v)
    assert FrameMaskAttention.for_mask(mask, tpf) is FrameMaskAttention.for_mask(mask.clone(), tpf)


def test_frame_mask_attention_views_contiguous_key_ranges():
    """Teacher forcing over 2 chunks: the clean chunks' keys (clean prefixes) and the first noisy chunk's (its own
    frames) are views; the second noisy chunk's (clean chunk 0 + itself) are gathered."""
    attend = FrameMaskAttention(teacher_forcing_mask(4, 2), 3)
    q = torch.randn(1, 1, 24, 4)
    attend(0, q, q, q)
    kinds = sorted(type(ki).__name__ for _, ki in attend._on[q.device])
    assert kinds == ["Tensor", "slice", "slice", "slice"]


def test_frame_mask_attention_refuses_frames_that_see_nothing():
    mask = teacher_forcing_mask(4, 2)
    mask[1] = False
    with pytest.raises(ValueError, match="sees no key frame"):
        FrameMaskAttention(mask, 2)


def test_causal_forward_without_token_mask_equals_the_masked_forward():
    """The model's causal path (grouped attention) equals the same forward through a token-masked SDPA."""
    from longstream.config import get_preset

    cfg = get_preset("tiny").transformer
    torch.manual_seed(0)
    model = CausalWanTransformer(cfg).double().eval()
    x = torch.randn(1, cfg.in_channels, 8, 4, 4, dtype=torch.float64)
    t = torch.rand(1, 8, dtype=torch.float64) * 1000
    text = torch.randn(1, 5, cfg.text_dim, dtype=torch.float64)
    mask = teacher_forcing_mask(4, 2)
    with torch.no_grad():
        got = model(x, t, text, causal=True, frame_mask=mask)
        want = model(x, t, text, causal=True, frame_mask=mask,
                     self_attention=lambda i, q, k, v, token_mask: attention(q, k, v, token_mask))
    assert (got - want).abs().max() < 1e-10 * want.abs().max()


def test_fused_qkv_projection_gives_the_same_outputs(tmp_path):
    """fuse_qkv: against diffusers' model with plain linears, and against the unfused model with FP8 linears
    (rowwise weights concatenate exactly); NVFP4 and LoRA-wrapped layers stay unfused; fusing twice is a no-op; a
    fused model is not saved."""
    import copy

    from longstream.model.checkpoints import CheckpointError, save_transformer
    from longstream.model.fuse_qkv import fuse_qkv
    from longstream.model.lora import LoRAConfig, inject_lora
    from longstream.quant import quantize_model

    cfg = dict(heads=2, head_dim=16, layers=3, cin=4, cout=4, text_dim=16, ffn=64, latent=(3, 4, 6))  # 16 | dim
    ref_model = random_diffusers(**{k: v for k, v in cfg.items() if k != "latent"})
    model = CausalWanTransformer.from_diffusers(ref_model).eval()
    x, t, text = torch.randn(1, cfg["cin"], *cfg["latent"]), torch.rand(1) * 1000, torch.randn(1, 6, cfg["text_dim"])
    fp8_model = quantize_model(copy.deepcopy(model), "fp8")
    assert fp8_model.blocks[0].attn1.to_q.mode == "fp8"
    with torch.no_grad():
        expected, fp8_expected = ref_model(x, t, text).sample, fp8_model(x, t, text, causal=False)
        assert fuse_qkv(model) == cfg["layers"] and fuse_qkv(model) == 0
        assert not hasattr(model.blocks[0].attn1, "to_q")
        assert rel(model(x, t, text, causal=False), expected) < 1e-5
        assert fuse_qkv(fp8_model) == cfg["layers"]
        assert rel(fp8_model(x, t, text, causal=False), fp8_expected) < 1e-6
    nvfp4_model = quantize_model(CausalWanTransformer.from_diffusers(ref_model), "nvfp4")
    assert fuse_qkv(nvfp4_model) == 0
    with pytest.raises(CheckpointError, match="fused q/k/v"):
        save_transformer(model, tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()
    lora_model = CausalWanTransformer.from_diffusers(ref_model)
    inject_lora(lora_model, LoRAConfig(rank=2, targets=("blocks.0.attn1.to_q",)))
    assert fuse_qkv(lora_model) == cfg["layers"] - 1
