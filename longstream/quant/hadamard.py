"""Random Hadamard transform (RHT) on 16-element blocks of the last dim.

Used in NVFP4 training on the weight-gradient GEMM ``dW = dY^T X``: both operands are transformed
along the reduction (token) dim with the same seed before NVFP4 quantization. The transform is
orthogonal, so ``(T a) . (T b) == a . b`` and the GEMM result is unchanged in exact math, while
each outlier is spread over its 16-block, making block contents closer to Gaussian (NVIDIA's NVFP4
training recipe, arXiv 2509.25149). It is not a free accuracy win: on small random CPU matrices
it does not lower the 1x16 RNE GEMM error by itself. Fprop and dgrad GEMMs do not use it.

Definition: for each block b (16 values), ``T b = H16 (d * b)`` where ``H16`` is the Sylvester
Hadamard matrix scaled by 1/4 (symmetric, ``H16 @ H16 = I``) and ``d`` is a +-1 vector drawn from
``torch.Generator().manual_seed(seed)`` on the CPU (same signs on every device). The inverse is
``d * (H16 c)``.
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK = 16


def hadamard_matrix(n: int = BLOCK, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Sylvester Hadamard matrix of size n (a power of 2), normalized by 1/sqrt(n) (orthonormal)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def random_signs(seed: int, n: int = BLOCK, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Deterministic +-1 vector of length n from ``seed`` (drawn on the CPU)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (n,), generator=g)
    return (bits * 2 - 1).to(dtype=dtype, device=device)


def rht_matrix(seed: int, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """16x16 matrix M with ``block_row @ M == T(block)``: ``M = diag(d) @ H16`` (H16 symmetric)."""
    h = hadamard_matrix(BLOCK, torch.float32, device)
    d = random_signs(seed, BLOCK, torch.float32, device)
    return (d[:, None] * h).to(dtype)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"last dim must be a multiple of {BLOCK}, got {tuple(x.shape)}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def random_hadamard(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply T to each 16-block of the last dim; computed in float32, returned in ``x.dtype``."""
    m = rht_matrix(seed, torch.float32, x.device)
    return (_blocks(x) @ m).reshape(x.shape).to(x.dtype)


def inverse_random_hadamard(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Inverse of ``random_hadamard`` with the same seed (``M^T``, since M is orthogonal)."""
    m = rht_matrix(seed, torch.float32, x.device)
    return (_blocks(x) @ m.t()).reshape(x.shape).to(x.dtype)
