"""umT5-XXL prompt embeddings for the Wan checkpoints, from local files only, with an on-disk cache.

`UMT5Encoder(path)` takes a diffusers Wan pipeline folder (its ``text_encoder/`` and ``tokenizer/``) or one folder
holding both the `UMT5EncoderModel` (config.json + safetensors) and its tokenizer; transformers loads them with
``local_files_only=True``, so nothing is ever fetched from the Hub. The model is loaded on first need only.

Embeddings follow the diffusers Wan pipeline (``WanPipeline._get_t5_prompt_embeds``): the prompt is cleaned (HTML
entities unescaped twice, runs of whitespace collapsed; ftfy is not used), tokenized with padding to
``max_length`` = 512 and truncation, encoded with the attention mask, and every position after the prompt's tokens
(EOS included) is set to zero: ``[B, 512, 4096]``, returned in float32.

Cache (``cache_dir``): one safetensors file per prompt, ``<sha256>.safetensors`` with the tensor ``embedding``
[tokens, dim] in the encoder's dtype (the zero padding is not stored) and metadata ``longstream_format`` =
"prompt-embedding/1", ``prompt`` and ``encoder``. The file name hashes the cleaned prompt, ``max_length``, the
encoder dtype and the encoder fingerprint: SHA-256 of the encoder and tokenizer files (config, weights,
vocabulary), memoized in ``fingerprints.json`` by path, size and modification time so large weights are hashed
once. Files are written atomically; an unreadable cache file is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import LongstreamError
from ..paths import write_text_atomic
from ..safetensors_io import load, save_atomic

CACHE_FORMAT = "prompt-embedding/1"
MAX_LENGTH = 512  # Wan's text length
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class TextEncoderError(LongstreamError):
    """A text encoder that cannot be found or loaded; the message names the folder."""


def clean_prompt(prompt: str) -> str:
    """The diffusers Wan pipeline's prompt cleaning, without ftfy: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(prompt)).strip()).strip()


def _locate(path: Path, tokenizer: Path | None) -> tuple[Path, Path]:
    if not path.is_dir():
        raise TextEncoderError(f"{path}: no such text encoder folder (a local folder is needed; nothing is "
                               f"downloaded)")
    encoder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    tokenizer = tokenizer or (path / "tokenizer" if (path / "tokenizer").is_dir() else path)
    if not (encoder / "config.json").is_file():
        raise TextEncoderError(f"{encoder}: no config.json of a text encoder")
    if not tokenizer.is_dir():
        raise TextEncoderError(f"{tokenizer}: no such tokenizer folder")
    return encoder, tokenizer


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class UMT5Encoder:
    """Prompts -> [B, max_length, dim] float32 embeddings with a UMT5 encoder (see the module docstring).

    `dtype` is the encoder's compute dtype (bf16 by default, as Wan runs it). With `offload` the weights stay in
    CPU memory and move to `device` only while encoding (umT5-XXL is ~11 GB in bf16). `cache_dir` enables the
    prompt-embedding cache: prompts found there never load the encoder.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        offload: bool = False,
        cache_dir: str | Path | None = None,
        max_length: int = MAX_LENGTH,
    ) -> None:
        self.encoder_dir, self.tokenizer_dir = _locate(Path(path), Path(tokenizer) if tokenizer else None)
        config = json.loads((self.encoder_dir / "config.json").read_text())
        if "d_model" not in config:
            raise TextEncoderError(f"{self.encoder_dir}: config.json is not a T5-family encoder's (no d_model)")
        self.dim: int = config["d_model"]
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload
        self.max_length = max_length
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._model = None
        self._tokenizer = None
        self._fingerprint: str | None = None

    # -- identity and cache --------------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        files = {p for d in (self.encoder_dir, self.tokenizer_dir) for p in d.iterdir() if p.is_file()}
        return sorted(files)

    def fingerprint(self) -> str:
        """SHA-256 over the encoder's and tokenizer's files (names and content hashes)."""
        if self._fingerprint is None:
            memo_path = self.cache_dir / "fingerprints.json" if self.cache_dir is not None else None
            try:
                memo = json.loads(memo_path.read_text()) if memo_path is not None and memo_path.is_file() else {}
            except ValueError:
                memo = {}
            digest = hashlib.sha256()
            for path in self._files():
                stat = path.stat()
                key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
                if key not in memo:
                    memo[key] = _file_digest(path)
                digest.update(f"{path.name}:{memo[key]}\n".encode())
            if memo_path is not None:
                write_text_atomic(memo_path, json.dumps(memo, indent=0, sort_keys=True))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _cache_path(self, prompt: str) -> Path:
        key = json.dumps({"prompt": prompt, "encoder": self.fingerprint(), "dtype": str(self.dtype),
                          "max_length": self.max_length}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def _read_cached(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            tensors, metadata = load(path, TextEncoderError, "prompt-embedding")
        except TextEncoderError:
            return None
        emb = tensors.get("embedding")
        if (metadata.get("longstream_format") != CACHE_FORMAT or emb is None or emb.ndim != 2
                or emb.shape[0] > self.max_length or emb.shape[1] != self.dim):
            return None
        return emb

    # -- model -----------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise TextEncoderError(f"{self.tokenizer_dir}: cannot load the tokenizer "
                                   f"({str(exc).strip().splitlines()[0]})") from None
        try:
            model = UMT5EncoderModel.from_pretrained(self.encoder_dir, dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise TextEncoderError(f"{self.encoder_dir}: cannot load the UMT5 encoder "
                                   f"({str(exc).strip().splitlines()[0]})") from None
        self._model = model.eval().to("cpu" if self.offload else self.device)

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's embedding [tokens, dim] (EOS included, no padding) in the encoder's dtype, on the CPU."""
        if self._model is None:
            self._load()
        batch = self._tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        if self.offload:
            self._model.to(self.device)
        try:
            ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
            hidden = self._model(ids, mask).last_hidden_state.to(self.dtype)
        finally:
            if self.offload:
                self._model.to("cpu")
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n].cpu() for h, n in zip(hidden, lengths)]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[len(prompts), max_length, dim] float32 embeddings, zero after each prompt's tokens."""
        cleaned = [clean_prompt(p) for p in prompts]
        found: dict[str, torch.Tensor] = {}
        if self.cache_dir is not None:
            for prompt in dict.fromkeys(cleaned):
                cached = self._read_cached(self._cache_path(prompt))
                if cached is not None:
                    found[prompt] = cached
        todo = [p for p in dict.fromkeys(cleaned) if p not in found]
        if todo:
            for prompt, emb in zip(todo, self._run(todo)):
                found[prompt] = emb
                if self.cache_dir is not None:
                    save_atomic({"embedding": emb}, self._cache_path(prompt),
                                {"longstream_format": CACHE_FORMAT, "prompt": prompt, "encoder": self.fingerprint()})
        out = torch.zeros(len(prompts), self.max_length, self.dim)
        for i, prompt in enumerate(cleaned):
            out[i, : found[prompt].shape[0]] = found[prompt].float()
        return out
