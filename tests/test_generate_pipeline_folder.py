"""`generate --checkpoint PIPELINE_FOLDER` uses the folder's transformer, umT5 text encoder and VAE (tiny random
stand-ins written here in the diffusers layout); explicit --text-encoder / --vae give the same video; a text
encoder or VAE that does not fit the preset is one clear line."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from longstream.cli import main  # noqa: E402
from longstream.config import get_preset  # noqa: E402
from longstream.pipeline.video_io import read_frames  # noqa: E402
from longstream.vae import build_vae  # noqa: E402

WORDS = "a red ball bounces blue".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)


def _text_encoder(folder, d_model):
    config = transformers.UMT5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
    transformers.UMT5EncoderModel(config).save_pretrained(folder / "text_encoder")
    _tokenizer(folder / "tokenizer")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan-pipeline")
    torch.manual_seed(0)
    t = get_preset("tiny").transformer
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=t.num_attention_heads,
                          attention_head_dim=t.attention_head_dim, in_channels=16, out_channels=16,
                          text_dim=t.text_dim, freq_dim=t.freq_dim, ffn_dim=t.ffn_dim, num_layers=t.num_layers,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads").save_pretrained(root / "transformer")
    _text_encoder(root, t.text_dim)
    build_vae("test-wan2.1", seed=7, latents_mean=torch.randn(16).tolist()).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def _generate(tmp_path, name, *args):
    out = tmp_path / f"{name}.mp4"
    code = main(["generate", "--preset", "tiny", "--prompt", "a red ball bounces", "--seconds", "0.5",
                 "--width", "32", "--height", "32", "--quiet", "-o", str(out), *args])
    return code, out


def test_pipeline_folder_provides_text_encoder_and_vae(pipeline, tmp_path):
    code, whole = _generate(tmp_path, "whole", "--checkpoint", str(pipeline))
    assert code == 0
    code, parts = _generate(tmp_path, "parts", "--checkpoint", str(pipeline / "transformer"),
                            "--text-encoder", str(pipeline), "--vae", str(pipeline / "vae"))
    assert code == 0
    code, plain = _generate(tmp_path, "plain", "--checkpoint", str(pipeline / "transformer"))
    assert code == 0
    a, b, c = (read_frames(p).astype(np.int16) for p in (whole, parts, plain))
    assert np.abs(a - b).mean() < 0.5, np.abs(a - b).mean()  # same models (up to float rounding in the codec path)
    assert np.abs(a - c).mean() > 5  # the hash encoder and a random VAE make another video


@pytest.mark.parametrize("flag,make,message", [
    ("--text-encoder", lambda p: _text_encoder(p, 32) or p, "makes 32-wide embeddings"),
    ("--vae", lambda p: build_vae("test-wan2.2", seed=1).save_pretrained(p) or p, "48 latent channels"),
])
def test_components_that_do_not_fit_are_one_line(tmp_path, capsys, flag, make, message):
    folder = make(tmp_path / "component")
    capsys.readouterr()  # the writers' own progress output
    code, out = _generate(tmp_path, "x", flag, str(folder))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and not out.exists()
