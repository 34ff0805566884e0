"""LongLive / Self-Forcing checkpoints: PyTorch `.pt` pickles, read with `torch.load(weights_only=True)` (plain
tensors and containers only: no code runs while loading).

* Generator: ``{"generator": state, "generator_ema": state, ...}`` (other entries such as critic weights are
  ignored), or a bare state dict. Names are the original Wan ones under a ``model.`` prefix (the wrapper's
  attribute), e.g. ``model.blocks.0.self_attn.q.weight``; tensors are usually bf16. See `keys.py`.
* LoRA: ``{"generator_lora": state}`` or a bare state dict, written by peft's ``get_peft_model_state_dict`` for a
  peft model wrapped around the causal Wan model (LongLive's ``configure_lora_for_model`` targets every
  ``nn.Linear`` inside its attention blocks): ``base_model.model.blocks.N.<module>.lora_A.weight`` [rank, in] and
  ``...lora_B.weight`` [out, rank], ``<module>`` one of ``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``,
  ``ffn.0``, ``ffn.2``. The file stores no alpha: LongLive's default is alpha = rank (scale 1), which is what
  `convert_lora` assumes unless told otherwise. An extra ``model.`` after the peft prefix is accepted too.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch

from ..config import TransformerConfig
from ..model.checkpoints import CheckpointError
from ..model.lora import FORMAT as LORA_FORMAT
from ..safetensors_io import save_atomic
from .keys import BLOCK_LINEARS, expected_shapes, from_original
from .wan_format import strip_prefix

GENERATOR_KEYS = ("generator", "generator_ema")
LORA_KEY = "generator_lora"
_LORA_NAME = re.compile(r"(?:base_model\.model\.)?(?:model\.)?blocks\.(\d+)\.(.+)\.lora_([AB])\.weight")


def read_torch(path: str | Path) -> dict:
    """The dict pickled in `path`, loaded with weights_only=True and memory-mapped; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive inside; truncated or another "
                              f"kind of file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for damaged archives and disallowed pickles
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of state dicts")
    return obj


def is_lora(obj: dict) -> bool:
    """Whether a loaded LongLive pickle holds a LoRA (a `generator_lora` entry or lora_A/lora_B tensor names)."""
    return LORA_KEY in obj or (bool(obj) and all(isinstance(k, str) and ".lora_" in k for k in obj))


def _tensors(path: Path, state: object, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: {what} is not a state dict of tensors")
    return state


def read_longlive(
    path: str | Path, expected: TransformerConfig | None = None, ema: bool = False
) -> tuple[dict[str, torch.Tensor], TransformerConfig]:
    """(state dict in our naming, config) of a LongLive generator: `generator`, or `generator_ema` with `ema`."""
    path = Path(path)
    obj = read_torch(path)
    if is_lora(obj):
        raise CheckpointError(f"{path}: a LoRA, not a generator checkpoint (convert it as longlive-lora)")
    key = GENERATOR_KEYS[1] if ema else GENERATOR_KEYS[0]
    if any(k in obj for k in GENERATOR_KEYS):
        if key not in obj:
            raise CheckpointError(f"{path}: no {key!r} entry (it has {', '.join(map(repr, obj))})")
        state = _tensors(path, obj[key], repr(key))
    elif ema:
        raise CheckpointError(f"{path}: no {key!r} entry: a bare state dict has no EMA weights")
    else:
        state = _tensors(path, obj, "the file")
    return from_original(path, strip_prefix(state, ("model.",)), expected)


def convert_lora(
    path: str | Path,
    output: str | Path,
    alpha: float | None = None,
    expected: TransformerConfig | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[int, float, int]:
    """Write a LongLive LoRA as a longstream LoRA file (`longstream.model.lora` format, our module names,
    atomically, cast to `dtype` when given); returns (rank, alpha, layers). `alpha` defaults to the rank. With
    `expected` (a preset's config) every layer and shape is checked against that model; all problems of a file
    go into one line."""
    path = Path(path)
    obj = read_torch(path)
    if not is_lora(obj):
        raise CheckpointError(f"{path}: not a LoRA (no {LORA_KEY!r} entry and no lora_A/lora_B tensors)")
    state = _tensors(path, obj.get(LORA_KEY, obj), "the LoRA")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        match = _LORA_NAME.fullmatch(key)
        if match is None or match.group(2) not in BLOCK_LINEARS:
            unknown.append(key)
            continue
        index, module, ab = match.groups()
        out[f"blocks.{index}.{BLOCK_LINEARS[module]}.lora_{ab}"] = tensor if dtype is None else tensor.to(dtype)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise CheckpointError(f"{path}: unexpected {len(unknown)} LoRA tensors: {', '.join(sorted(unknown)[:3])}{more}")
    if not out:
        raise CheckpointError(f"{path}: the LoRA holds no tensors")
    modules = sorted({k.rsplit(".", 1)[0] for k in out})
    half = [f"{m}.lora_{ab}" for m in modules for ab in "AB" if f"{m}.lora_{ab}" not in out]
    if half:
        raise CheckpointError(f"{path}: LoRA layers without their other half: {', '.join(half[:3])}")
    ranks = {out[f"{m}.lora_A"].shape[0] for m in modules} | {out[f"{m}.lora_B"].shape[-1] for m in modules}
    if len(ranks) != 1 or any(out[f"{m}.lora_{ab}"].ndim != 2 for m in modules for ab in "AB"):
        raise CheckpointError(f"{path}: LoRA layers disagree on the rank ({sorted(ranks)}) or are not matrices")
    rank = ranks.pop()
    if expected is not None:
        _check_lora_shapes(path, out, modules, expected)
    alpha = float(rank) if alpha is None else float(alpha)
    metadata = {"longstream_format": LORA_FORMAT, "rank": str(rank), "alpha": repr(alpha),
                "targets": json.dumps(modules), "source": path.name}
    save_atomic(out, output, metadata)
    return rank, alpha, len(modules)


def _check_lora_shapes(
    path: Path, lora: dict[str, torch.Tensor], modules: list[str], config: TransformerConfig
) -> None:
    weights = expected_shapes(config)
    problems = []
    for m in modules:
        weight = weights.get(f"{m}.weight")
        if weight is None:
            problems.append(f"{m} is not in the model")
            continue
        got = (lora[f"{m}.lora_B"].shape[0], lora[f"{m}.lora_A"].shape[1])
        if got != tuple(weight.shape):
            problems.append(f"{m} {got} != {tuple(weight.shape)}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: LoRA does not fit the model: {'; '.join(problems[:3])}{more}")
