"""One projection for a self-attention's q, k and v (inference).

`to_q`, `to_k` and `to_v` of a block's self-attention read the same normed input. `fuse_qkv` replaces them by
one layer `to_qkv` with the three weights concatenated along the output dimension: one GEMM of N = 3D instead of
three of N = D, and, for quantized linears, one activation quantize instead of three. The outputs are the same
numbers (bf16 and fp8 rowwise weights concatenate exactly; the GEMM may sum in another order). Layers that cannot
be concatenated are left alone: NVFP4 (per-tensor global scales), mixed formats and LoRA-wrapped layers.
Parameter names change, so fuse after loading weights and adapters; `save_transformer` refuses a fused model.
"""

from __future__ import annotations

from torch import nn

from ..quant.linear import QuantError, QuantLinear


def _concatenated(layers: list[nn.Module]) -> nn.Module | None:
    if all(type(m) is nn.Linear for m in layers):  # plain weights: bf16-mode layers compute the same F.linear
        layers = [QuantLinear.from_linear(m, "bf16") for m in layers]
    if not all(isinstance(m, QuantLinear) for m in layers):
        return None
    try:
        return QuantLinear.concatenated(layers)
    except QuantError:  # nvfp4, or layers of different formats
        return None


def has_fused_qkv(model: nn.Module) -> bool:
    return any(getattr(m, "to_qkv", None) is not None for m in model.modules())


def fuse_qkv(model: nn.Module) -> int:
    """Fuse q, k and v of every block's self-attention (`blocks[i].attn1`) where the layers allow it (see the
    module docstring); in place, inference only (the fused weights do not train). Returns the blocks fused."""
    fused = 0
    for block in model.blocks:
        attn = block.attn1
        if attn.to_qkv is not None:
            continue
        qkv = _concatenated([attn.to_q, attn.to_k, attn.to_v])
        if qkv is None:
            continue
        del attn.to_q, attn.to_k, attn.to_v
        attn.to_qkv = qkv
        fused += 1
    return fused
