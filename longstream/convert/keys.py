"""Key tables between the original Wan naming and ours (= diffusers' `WanTransformer3DModel`), and the model
shape read off a state dict.

Original Wan (`wan/modules/model.py`, also LongLive / Self-Forcing under a `model.` prefix) -> ours:

| original                                   | ours                                              |
| ------------------------------------------ | ------------------------------------------------- |
| patch_embedding                            | patch_embedding                                   |
| text_embedding.0 / .2                      | condition_embedder.text_embedder.linear_1 / _2    |
| time_embedding.0 / .2                      | condition_embedder.time_embedder.linear_1 / _2    |
| time_projection.1                          | condition_embedder.time_proj                      |
| blocks.N.self_attn.{q,k,v,o}               | blocks.N.attn1.{to_q,to_k,to_v,to_out.0}          |
| blocks.N.self_attn.norm_{q,k}              | blocks.N.attn1.norm_{q,k}                         |
| blocks.N.cross_attn.*                      | blocks.N.attn2.* (as self_attn)                   |
| blocks.N.norm3 (affine, before cross-attn) | blocks.N.norm2                                    |
| blocks.N.ffn.0 / .2                        | blocks.N.ffn.net.0.proj / ffn.net.2               |
| blocks.N.modulation [1, 6, D]              | blocks.N.scale_shift_table                        |
| head.head                                  | proj_out                                          |
| head.modulation [1, 2, D]                  | scale_shift_table                                 |

Wan's parameter-free norms (block norm1/norm2, head.norm) hold no tensors. Every module keeps its parameter
suffix (`.weight`, `.bias`). Image-conditioning parts of the I2V models (`img_emb`, `k_img`, ...) have no
counterpart here, so such checkpoints are refused as unexpected keys.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..config import PRESETS, ConfigError, TransformerConfig
from ..model.checkpoints import CheckpointError, check_state_dict
from ..model.transformer import CausalWanTransformer

# module names inside a block: original -> ours
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
BLOCK_MODULES: dict[str, str] = {
    **{f"self_attn.{k}": f"attn1.{v}" for k, v in _ATTENTION.items()},
    **{f"cross_attn.{k}": f"attn2.{v}" for k, v in _ATTENTION.items()},
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# top-level module names: original -> ours
TOP_MODULES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Linear layers of a block (the modules LongLive's LoRA wraps): original -> ours
BLOCK_LINEARS: dict[str, str] = {
    k: v for k, v in BLOCK_MODULES.items() if not k.endswith(("norm_q", "norm_k", "norm3"))
}
WAN_HEAD_DIM = 128  # every released Wan2.1/2.2 model (1.3B: 1536/12, 5B: 3072/24, 14B: 5120/40)

_BLOCK_INVERSE = {v: k for k, v in BLOCK_MODULES.items()}
_TOP_INVERSE = {v: k for k, v in TOP_MODULES.items()}


def ours_to_original(key: str) -> str:
    """The original Wan name of one of our parameter names (KeyError when it has none)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match:
        index, rest = match.groups()
        if rest == "scale_shift_table":
            return f"blocks.{index}.modulation"
        module, _, param = rest.rpartition(".")
        return f"blocks.{index}.{_BLOCK_INVERSE[module]}.{param}"
    if key == "scale_shift_table":
        return "head.modulation"
    module, _, param = key.rpartition(".")
    return f"{_TOP_INVERSE[module]}.{param}"


def original_to_ours(key: str) -> str | None:
    """Our name of an original Wan parameter name, or None when the table has no such tensor."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match:
        index, rest = match.groups()
        if rest == "modulation":
            return f"blocks.{index}.scale_shift_table"
        module, _, param = rest.rpartition(".")
        return f"blocks.{index}.{BLOCK_MODULES[module]}.{param}" if module in BLOCK_MODULES else None
    if key == "head.modulation":
        return "scale_shift_table"
    module, _, param = key.rpartition(".")
    return f"{TOP_MODULES[module]}.{param}" if module in TOP_MODULES else None


def from_original(
    path: str | Path, state: dict[str, torch.Tensor], expected: TransformerConfig | None, heads: int | None = None
) -> tuple[dict[str, torch.Tensor], TransformerConfig]:
    """(state dict in our naming, config) of an original-Wan state dict, checked strictly: every missing,
    unexpected or mis-shaped tensor is listed (in the original naming) in one CheckpointError. The config is
    inferred from the shapes (`heads` or the expected preset's heads when given) and must equal `expected`."""
    renamed = {original_to_ours(k): v for k, v in state.items() if original_to_ours(k) is not None}
    heads = heads if heads is not None else (expected.num_attention_heads if expected is not None else None)
    config = check_config(path, infer_config(path, renamed, heads), expected)
    wanted = {ours_to_original(k): t for k, t in expected_shapes(config).items()}
    check_state_dict(path, state, wanted)
    return {original_to_ours(k): v for k, v in state.items()}, config


def expected_shapes(config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Our state dict for `config` on the meta device (names, shapes and dtypes only)."""
    with torch.device("meta"):
        return CausalWanTransformer(config).state_dict()


def _shape(path: str | Path, state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: cannot tell the model's shape: no {key}")
    return tuple(state[key].shape)


def infer_config(path: str | Path, state: dict[str, torch.Tensor], heads: int | None = None) -> TransformerConfig:
    """The TransformerConfig of a state dict in our naming, read off tensor shapes. The number of attention heads
    is not in the shapes: `heads` when given, else the heads of a preset with the same other fields, else
    dim / 128 (Wan's head size); CheckpointError naming the file when none of these applies."""
    dim, in_channels, *patch = _shape(path, state, "patch_embedding.weight")
    text_dim = _shape(path, state, "condition_embedder.text_embedder.linear_1.weight")[1]
    freq_dim = _shape(path, state, "condition_embedder.time_embedder.linear_1.weight")[1]
    ffn_dim = _shape(path, state, "blocks.0.ffn.net.0.proj.weight")[0]
    out_features = _shape(path, state, "proj_out.weight")[0]
    layers = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if out_features % math.prod(patch):
        raise CheckpointError(f"{path}: proj_out has {out_features} outputs, not a multiple of the patch {patch}")
    fields = dict(num_layers=layers, ffn_dim=ffn_dim, in_channels=in_channels, text_dim=text_dim, freq_dim=freq_dim,
                  out_channels=out_features // math.prod(patch), patch_size=tuple(patch),
                  cross_attn_norm="blocks.0.norm2.weight" in state)
    if heads is None:
        same = [p.transformer for p in PRESETS.values()
                if p.transformer.dim == dim and all(getattr(p.transformer, k) == v for k, v in fields.items())]
        if same:
            heads = same[0].num_attention_heads
        elif dim % WAN_HEAD_DIM == 0:
            heads = dim // WAN_HEAD_DIM
        else:
            raise CheckpointError(f"{path}: cannot tell the number of attention heads of a {dim}-wide model; "
                                  f"name a preset")
    if dim % heads:
        raise CheckpointError(f"{path}: width {dim} is not divisible into {heads} attention heads")
    try:
        return TransformerConfig(num_attention_heads=heads, attention_head_dim=dim // heads, **fields)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: impossible model shape ({exc})") from None


def check_config(path: str | Path, found: TransformerConfig, expected: TransformerConfig | None) -> TransformerConfig:
    """`expected` (a preset's) when given and equal to `found`; CheckpointError naming the first difference."""
    if expected is None or found == expected:
        return found
    name = next(f for f in TransformerConfig.__dataclass_fields__ if getattr(found, f) != getattr(expected, f))
    raise CheckpointError(f"{path}: checkpoint is for another model: {name}={getattr(found, name)} but the preset "
                          f"has {getattr(expected, name)}")
