"""Text encoders: prompts -> embeddings [B, L, text_dim] for the transformer's cross-attention.

`HashTextEncoder` is a fixed, download-free encoder for small models and tests: each lower-cased word maps to a
deterministic random vector (seeded by a stable hash of the word), plus a sinusoidal position code, padded with
zeros to `max_tokens`. Equal prompts give equal embeddings on every machine.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Protocol, Sequence

import torch


class TextEncoder(Protocol):
    dim: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[len(prompts), L, dim] float32 embeddings."""


class HashTextEncoder:
    def __init__(self, dim: int, max_tokens: int = 32, seed: int = 0) -> None:
        self.dim, self.max_tokens, self.seed = dim, max_tokens, seed

    @staticmethod
    def words(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def _word_vector(self, word: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(word.encode()) ^ self.seed)
        return torch.randn(self.dim, generator=gen)

    def _position_code(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        code = torch.zeros(length, self.dim)
        code[:, 0::2] = torch.sin(pos * freq)
        code[:, 1::2] = torch.cos(pos * freq)[:, : self.dim // 2]
        return 0.5 * code

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for i, prompt in enumerate(prompts):
            words = self.words(prompt)[: self.max_tokens]
            if not words:
                raise ValueError(f"prompt {prompt!r} has no words")
            vecs = torch.stack([self._word_vector(w) for w in words])
            out[i, : len(words)] = vecs + self._position_code(len(words))
        return out
