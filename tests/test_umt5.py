"""umT5 prompt embeddings: a tiny random UMT5 encoder and a word-level tokenizer built here (no downloads),
compared with diffusers' Wan pipeline encoding; the on-disk cache."""

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from longstream.text.umt5 import MAX_LENGTH, TextEncoderError, UMT5Encoder, clean_prompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "a red ball bounces on the blue floor cat walks in grass".split()


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A diffusers-style pipeline folder with text_encoder/ (tiny random UMT5, fp32 weights) and tokenizer/."""
    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
    transformers.UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    _tokenizer(root / "tokenizer")
    return root


def _reference(root, prompts, dtype):
    """diffusers' WanPipeline._get_t5_prompt_embeds on the same files."""
    from diffusers import WanPipeline

    pipe = types.SimpleNamespace(
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype,
                                                                   local_files_only=True).eval(),
    )
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(pipe, prompts, max_sequence_length=MAX_LENGTH,
                                                 device=torch.device("cpu"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_diffusers_wan_pipeline(pipeline_dir, dtype):
    prompts = ["a red ball bounces", "the  cat walks in grass &amp; on the floor", "blue"]
    encoder = UMT5Encoder(pipeline_dir, dtype=dtype)
    got = encoder.encode(prompts)
    assert got.shape == (3, MAX_LENGTH, 16) and got.dtype == torch.float32
    expected = _reference(pipeline_dir, prompts, dtype)
    assert torch.equal(got, expected.float())
    lengths = [len(clean_prompt(p).split()) + 1 for p in prompts]  # + EOS
    for row, n in zip(got, lengths):
        assert row[:n].abs().sum(-1).gt(0).all() and not row[n:].any()


def test_cache_hits_skip_the_encoder(pipeline_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = UMT5Encoder(pipeline_dir, cache_dir=cache).encode(["a red ball", "blue floor"])
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == 2 and "fingerprints.json" in files
    assert not [f for f in files if f.startswith(".")]  # no temporary file left

    again = UMT5Encoder(pipeline_dir, cache_dir=cache)
    monkeypatch.setattr(again, "_load", lambda: pytest.fail("the encoder was loaded for cached prompts"))
    assert torch.equal(again.encode(["blue   floor", "a red ball"]), first.flip(0))  # cleaning: same key


def test_cache_key_covers_encoder_and_dtype(pipeline_dir, tmp_path):
    cache = tmp_path / "cache"
    UMT5Encoder(pipeline_dir, cache_dir=cache).encode(["a red ball"])
    UMT5Encoder(pipeline_dir, cache_dir=cache, dtype=torch.float32).encode(["a red ball"])
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_damaged_cache_file_is_recomputed(pipeline_dir, tmp_path):
    cache = tmp_path / "cache"
    good = UMT5Encoder(pipeline_dir, cache_dir=cache).encode(["a cat"])
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:20])
    assert torch.equal(UMT5Encoder(pipeline_dir, cache_dir=cache).encode(["a cat"]), good)
    assert entry.stat().st_size > 20


def test_offload_keeps_weights_on_the_cpu(pipeline_dir):
    encoder = UMT5Encoder(pipeline_dir, offload=True, dtype=torch.float32)
    assert torch.equal(encoder.encode(["a red ball"]), UMT5Encoder(pipeline_dir, dtype=torch.float32).encode(
        ["a red ball"]))
    assert next(encoder._model.parameters()).device.type == "cpu"


def test_separate_folders_and_clear_errors(pipeline_dir, tmp_path):
    encoder = UMT5Encoder(pipeline_dir / "text_encoder", tokenizer=pipeline_dir / "tokenizer")
    assert encoder.dim == 16 and encoder.encode(["a ball"]).shape == (1, MAX_LENGTH, 16)
    with pytest.raises(TextEncoderError, match="google/umt5-xxl: no such text encoder folder .*nothing is downloaded"):
        UMT5Encoder("google/umt5-xxl")
    with pytest.raises(TextEncoderError, match="no config.json of a text encoder"):
        UMT5Encoder(tmp_path)
    (tmp_path / "config.json").write_text('{"d_model": 16}')
    with pytest.raises(TextEncoderError, match=f"{tmp_path}: cannot load the tokenizer"):
        UMT5Encoder(tmp_path).encode(["a"])
