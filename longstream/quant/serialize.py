"""Save and load models quantized with `quantize_model` (safetensors, pre-quantized weights).

Format (one `.safetensors` file), ``<name>`` being a QuantLinear's module name:

* nvfp4 layers: ``<name>.qdata`` uint8 [N, K/2] (two E2M1 codes per byte, low nibble first),
  ``<name>.scale`` uint8 [N, K/16] (the E4M3 block-scale bits), ``<name>.global_scale`` float32 [] (0-dim);
* fp8 layers: ``<name>.qdata`` uint8 [N, K] (the E4M3 bits), ``<name>.scale`` float32 [N, 1];
* bf16 layers: ``<name>.weight`` in its dtype;
* ``<name>.bias`` in its dtype for layers with a bias;
* every other entry of the model's state dict under its own name and dtype (layers kept in high precision,
  norms, embeddings, ...).

E4M3 tensors are stored as their uint8 bit patterns (so any safetensors reader can open the file). Metadata:
``longstream_format`` = "quantized/1", ``mode`` = the mode of the quantized layers ("mixed" if several),
``layers`` = JSON object {module name: mode} of every QuantLinear, and ``config`` = the model's config as JSON
when it has a dataclass ``config``. NVFP4 needs 9 bytes per 16 weights (3.56x smaller than bf16, 7.1x than fp32).

`load_quantized(skeleton, path)` turns the skeleton's named `nn.Linear` layers into empty `QuantLinear`s and
loads every tensor; the skeleton should have the saved model's dtype for bit-identical outputs (high-precision
tensors are cast to the skeleton's dtypes). Every problem raises `QuantFileError`, one line naming the file; a
skeleton that failed to load may be left partly converted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import LongstreamError
from ..safetensors_io import load, save_atomic
from .linear import MODES, QuantError, QuantLinear, _set_submodule

FORMAT = "quantized/1"


class QuantFileError(LongstreamError):
    """A quantized-weights file that cannot be loaded into the given model; the message names the file."""


def _to_file(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def save_quantized(model: nn.Module, path: str | Path, extra_metadata: Optional[dict[str, str]] = None) -> None:
    """Write the model's state (quantized layers packed, see the module docstring), atomically."""
    layers = {n: m.mode for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    modes = sorted(set(layers.values()))
    metadata = {
        "longstream_format": FORMAT,
        "mode": modes[0] if len(modes) == 1 else ("mixed" if modes else "none"),
        "layers": json.dumps(layers),
    }
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        metadata["config"] = json.dumps(dataclasses.asdict(cfg))
    metadata.update(extra_metadata or {})
    save_atomic({k: _to_file(v) for k, v in model.state_dict().items()}, path, metadata)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    tensors, metadata = load(path, QuantFileError, "quantized-weights")
    return metadata, tensors


def load_quantized(model: nn.Module, path: str | Path, *, backend: Optional[str] = None) -> nn.Module:
    """Restore a `save_quantized` file into `model` (a skeleton with plain `nn.Linear` layers, or an already
    quantized model of the same layout), in place; returns the model."""
    path = Path(path)
    metadata, tensors = _read(path)
    if metadata.get("longstream_format") != FORMAT:
        raise QuantFileError(f"{path}: not a longstream quantized-weights file "
                             f"(format {metadata.get('longstream_format')!r}, expected {FORMAT!r})")
    try:
        layers = json.loads(metadata["layers"])
    except (KeyError, ValueError):
        layers = None
    if not isinstance(layers, dict) or not all(v in MODES for v in layers.values()):
        raise QuantFileError(f"{path}: bad or missing 'layers' metadata")

    for name, mode in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QuantFileError(f"{path}: quantized layer {name!r} is not in the model") from None
        if isinstance(module, QuantLinear) and module.mode == mode:
            continue
        if not isinstance(module, (nn.Linear, QuantLinear)):
            raise QuantFileError(f"{path}: {name!r} is a {type(module).__name__} in the model, not a Linear")
        if isinstance(module, nn.Linear):
            device, dtype = module.weight.device, module.weight.dtype
        else:  # a QuantLinear of another mode: keep its high-precision dtype
            hp = module.bias if module.bias is not None else getattr(module, "weight", None)
            device = next(itertools.chain(module.buffers(), module.parameters())).device
            dtype = hp.dtype if hp is not None else torch.bfloat16
        try:
            layer = QuantLinear(module.in_features, module.out_features, mode, module.bias is not None,
                                backend=backend, device=device, dtype=dtype)
        except QuantError as exc:
            raise QuantFileError(f"{path}: layer {name!r}: {exc}") from None
        _set_submodule(model, name, layer)

    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''})")
    state = {}
    for key, want in expected.items():
        if key not in tensors:
            continue
        got = tensors[key]
        if want.dtype == torch.float8_e4m3fn and got.dtype == torch.uint8:
            got = got.view(torch.float8_e4m3fn)
        if got.shape != want.shape:
            problems.append(f"{key} has shape {tuple(got.shape)}, the model {tuple(want.shape)}")
        elif got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()
                                              and want.dtype != torch.float8_e4m3fn):
            problems.append(f"{key} has dtype {got.dtype}, the model {want.dtype}")
        state[key] = got
    if problems:
        raise QuantFileError(f"{path}: does not fit the model: {'; '.join(problems[:4])}")
    model.load_state_dict(state, strict=True)
    return model
