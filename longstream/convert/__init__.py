"""Weights downloaded elsewhere -> longstream: format detection, conversion, and loading without converting.

Source formats (`FORMATS`), each with its own module and key table:

* ``diffusers``: a `WanTransformer3DModel` folder (config.json + safetensors, sharded or not), a diffusers
  pipeline folder (its ``transformer/``), or one diffusers-named safetensors file (`diffusers_format.py`);
* ``wan``: original Wan safetensors, a file or a folder (`wan_format.py`, key table in `keys.py`);
* ``longlive``: a LongLive / Self-Forcing generator ``.pt`` (`longlive_format.py`);
* ``longlive-lora``: a LongLive LoRA ``.pt``, converted to a longstream LoRA file.

Files already in a longstream format (``transformer/1``, ``quantized/1``) are detected as ``longstream``.
Nothing needs the network. Every problem raises one `CheckpointError` line naming the file and the first problems.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from pathlib import Path

import torch

from ..config import TransformerConfig
from ..errors import UsageError
from ..model.checkpoints import FORMAT as TRANSFORMER_FORMAT
from ..model.checkpoints import CheckpointError, check_state_dict, load_transformer, save_transformer
from ..model.lora import FORMAT as LORA_FORMAT
from ..model.transformer import CausalWanTransformer
from ..paths import output_file
from ..quant.serialize import FORMAT as QUANTIZED_FORMAT
from .diffusers_format import load_diffusers_vae, read_diffusers
from .files import component_dir, weight_files
from .keys import check_config
from .longlive_format import convert_lora, is_lora, read_longlive, read_torch
from .wan_format import read_wan

FORMATS = ("diffusers", "wan", "longlive", "longlive-lora")
QUANTIZE_MODES = ("fp8", "nvfp4")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")

__all__ = ["FORMATS", "QUANTIZE_MODES", "convert_checkpoint", "detect_format", "load_checkpoint",
           "load_diffusers_vae", "read_source"]


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception as exc:  # safetensors raises several error types for foreign or truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({reason})") from None


def _naming(path: Path, keys: list[str]) -> str:
    """diffusers or wan, from the tensor names."""
    if any(re.match(r"(.*\.)?condition_embedder\.", k) for k in keys):
        return "diffusers"
    if any(re.match(r"(.*\.)?time_embedding\.", k) for k in keys):
        return "wan"
    raise CheckpointError(f"{path}: not a Wan transformer (neither diffusers nor original Wan tensor names)")


def detect_format(path: str | Path) -> str:
    """One of FORMATS, or "longstream" for a file already converted; CheckpointError for anything else."""
    path = Path(path)
    if path.is_dir():
        folder = component_dir(path, "transformer")
        files, index = weight_files(folder)
        keys = list(json.loads(index.read_text())["weight_map"]) if index is not None else _header(files[0])[0]
        return _naming(folder, keys)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.suffix in TORCH_SUFFIXES or zipfile.is_zipfile(path):
        return "longlive-lora" if is_lora(read_torch(path)) else "longlive"
    keys, metadata = _header(path)
    if "longstream_format" in metadata:
        return "longstream"
    return _naming(path, keys)


def read_source(
    path: str | Path, fmt: str | None = None, expected: TransformerConfig | None = None, ema: bool = False
) -> tuple[dict[str, torch.Tensor], TransformerConfig, str]:
    """(state dict in our naming, config, format) of a transformer checkpoint in any source format. The config
    is read (diffusers config.json) or inferred from the shapes; with `expected` (a preset's) it must match."""
    fmt = fmt or detect_format(path)
    if fmt == "diffusers":
        return (*read_diffusers(path, expected), fmt)
    if fmt == "wan":
        return (*read_wan(path, expected), fmt)
    if fmt == "longlive":
        return (*read_longlive(path, expected, ema), fmt)
    if fmt == "longlive-lora":
        raise CheckpointError(f"{path}: a LoRA, not a transformer checkpoint (convert it, then use it as a LoRA)")
    if fmt == "longstream":
        raise CheckpointError(f"{path}: already a longstream checkpoint")
    raise UsageError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _main_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements (mixed-precision files are unified to it)."""
    counts = Counter()
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0]


def _build(path: str | Path, state: dict[str, torch.Tensor], config: TransformerConfig,
           dtype: torch.dtype | None) -> CausalWanTransformer:
    """The model holding `state` (emptied: its tensors move into the model), checked strictly against `config`."""
    with torch.device("meta"):
        model = CausalWanTransformer(config)
    check_state_dict(path, state, model.state_dict())
    dtype = dtype or _main_dtype(state)
    cast = {k: state.pop(k).to(dtype) for k in list(state)}  # popping frees each source tensor once cast
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    expected: TransformerConfig | None = None,
    quantize: str | None = None,
    dtype: torch.dtype | None = None,
    ema: bool = False,
    lora_alpha: float | None = None,
) -> str:
    """Convert `source` to a longstream file at `output` (a `.safetensors` path, written atomically) and return
    the source format. Transformers become ``transformer/1`` files, or ``quantized/1`` with `quantize` (fp8 |
    nvfp4, see `longstream.quant.serialize`); LongLive LoRAs become longstream LoRA files (alpha: `lora_alpha`,
    default the rank). `dtype` casts the weights (default: the source's); the source's provenance goes into
    the metadata (`source_format`, `source`)."""
    source, output = Path(source), Path(output)
    output_file(output, ".safetensors")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    fmt = fmt or detect_format(source)
    if fmt == "longlive-lora":
        if quantize is not None:
            raise UsageError("a LoRA is stored unquantized; drop --quantize")
        convert_lora(source, output, lora_alpha, expected, dtype)
        return fmt
    state, config, fmt = read_source(source, fmt, expected, ema)
    model = _build(source, state, config, dtype)
    provenance = {"source_format": fmt, "source": source.name}
    if quantize is None:
        save_transformer(model, output, provenance)
    else:
        from ..quant import quantize_model, save_quantized

        save_quantized(quantize_model(model, quantize), output, provenance)
    return fmt


def _load_quantized(path: Path, metadata: dict[str, str], expected: TransformerConfig | None,
                    device: torch.device | str, dtype: torch.dtype | None) -> CausalWanTransformer:
    from ..quant import load_quantized

    try:
        config = TransformerConfig(**json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: no usable model config in the quantized file ({exc})") from None
    config = check_config(path, config, expected)
    if dtype is None:  # the high-precision dtype: the output head's, which is never quantized
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            dtype = f.get_tensor("proj_out.weight").dtype if "proj_out.weight" in f.keys() else torch.float32
    with torch.device("meta"):
        skeleton = CausalWanTransformer(config)
    return load_quantized(skeleton.to(dtype=dtype).to_empty(device=device), path)


def load_checkpoint(
    path: str | Path,
    expected: TransformerConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ema: bool = False,
) -> CausalWanTransformer:
    """A `CausalWanTransformer` from any supported checkpoint: a longstream file (plain or quantized), a diffusers
    folder or file, original Wan safetensors, or a LongLive generator .pt (`ema` picks generator_ema). With
    `expected` (a preset's config) the checkpoint must be for that model."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "longstream":
        metadata = _header(path)[1]
        kind = metadata["longstream_format"]
        if kind == TRANSFORMER_FORMAT:
            return load_transformer(path, expected, device=device, dtype=dtype)
        if kind == QUANTIZED_FORMAT:
            return _load_quantized(path, metadata, expected, device, dtype)
        hint = "; use it as a LoRA" if kind == LORA_FORMAT else ""
        raise CheckpointError(f"{path}: a longstream {kind!r} file, not a transformer checkpoint{hint}")
    state, config, _ = read_source(path, fmt, expected, ema)
    return _build(path, state, config, dtype).to(device)
