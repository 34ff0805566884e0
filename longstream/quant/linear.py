"""Quantized inference linears: `QuantLinear` (bf16 | fp8 | nvfp4) and `quantize_model`.

Modes and what a `QuantLinear` holds (``N`` = out_features, ``K`` = in_features):

* ``bf16``: plain ``F.linear``; ``weight`` is the original parameter in the dtype it has (bf16 in deployment,
  float32 in tests), so the output is exactly ``nn.Linear``'s.
* ``fp8``: W8A8 rowwise E4M3 (``fp8.py`` conventions). Buffers ``qdata`` float8_e4m3fn [N, K] and ``scale``
  float32 [N, 1] (one per output channel), made once; the activation is quantized per token on every call and
  the GEMM is ``backend.fp8_matmul_rowwise``. Needs K and N multiples of 16 (``torch._scaled_mm``).
* ``nvfp4``: W4A4 NVFP4 (``nvfp4.py`` format), 1x16 blocks along K. Buffers ``qdata`` uint8 [N, K/2],
  ``scale`` float8_e4m3fn [N, K/16] and ``global_scale`` float32 [], made once; the activation is quantized
  per call (round to nearest even, its own global scale) by ``backend.nvfp4_linear``, which also multiplies.
  Needs K a multiple of 16.

In the quantized modes the high-precision weight is dropped. The bias is added to the GEMM's result (for nvfp4 on
the reference and Triton backends in float32, before the result's rounding: ``backend.nvfp4_linear``; else in the
input's dtype); the output has the input's dtype; leading dims are flattened for the GEMM and restored. The
backend is ``backend.default_backend(x.device)`` unless one is given. Quantization metadata keeps its dtype
through ``model.to(dtype)`` (only devices change), so a quantized model can be cast to bf16 safely.

These are inference layers. If autograd needs a gradient through one (a frozen quantized backbone under a
trainable LoRA, say), the input gets a straight-through gradient ``dX = dY @ dequantize(W)`` in float32; for
training with quantized GEMMs use ``longstream.quant.training``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LongstreamError
from . import backend as qb
from . import fp8
from .nvfp4 import NVFP4Tensor

MODES = ("bf16", "fp8", "nvfp4")

# Linear layers that stay in high precision, as the reference keeps them (small conditioning and output
# projections, numerically sensitive and too small to gain from quantization). Patterns are fnmatch patterns
# on module names; a pattern also covers everything below the module it names.
DEFAULT_SKIP: tuple[str, ...] = (
    "condition_embedder.*",  # time_embedder.linear_1/2, time_proj, text_embedder.linear_1/2 (diffusers names)
    "proj_out",  # output head
    "patch_embedding",  # a Conv3d, never a Linear; listed so the list reads like the reference's
    # the same layers in the original Wan naming (text_embedding.0/.2, time_embedding.0/.2, time_projection.1)
    "text_embedding.*",
    "time_embedding.*",
    "time_projection.*",
    "head.head",
)

# Buffers whose dtype is part of the format: `.to(dtype)` must not convert them.
_FORMAT_BUFFERS = ("qdata", "scale", "global_scale")


class QuantError(LongstreamError):
    """A quantization request that cannot work (unknown mode, unsupported shape)."""


def check_mode(mode: str) -> str:
    """Return `mode` if it is one of MODES, else raise QuantError naming the choices."""
    if mode not in MODES:
        raise QuantError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def unsupported_reason(in_features: int, out_features: int, mode: str) -> Optional[str]:
    """Why a Linear of this shape cannot run in `mode` (None if it can)."""
    if mode == "nvfp4" and in_features % 16:
        return f"in_features {in_features} is not a multiple of 16 (NVFP4 blocks)"
    if mode == "fp8" and (in_features % 16 or out_features % 16):
        return f"shape {out_features}x{in_features} is not a multiple of 16 (torch._scaled_mm)"
    return None


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """True if `name` or one of its parent module names matches a pattern of `skip`."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in skip for p in prefixes)


class _StraightThrough(torch.autograd.Function):
    """Quantized forward; backward: dX = dY @ dequantize(W) (straight-through), db = sum of dY."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return layer._gemm(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layer: QuantLinear = ctx.layer
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy.float() @ layer.dequantized_weight(torch.float32)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = dy.reshape(-1, dy.shape[-1]).float().sum(0).to(layer.bias.dtype)
        return dx, db, None


class QuantLinear(nn.Module):
    """Inference linear with a bf16, FP8 (W8A8 rowwise) or NVFP4 (W4A4) weight. See the module docstring.

    The constructor makes uninitialized storage of the right shapes (what `load_quantized` fills); use
    `from_linear` to quantize an existing `nn.Linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str = "nvfp4",
        bias: bool = True,
        *,
        backend: Optional[str] = None,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        check_mode(mode)
        reason = unsupported_reason(in_features, out_features, mode)
        if reason:
            raise QuantError(f"cannot make a {mode} QuantLinear: {reason}")
        if backend is not None:
            qb._check(backend)
        self.in_features, self.out_features, self.mode, self.backend = in_features, out_features, mode, backend
        n, k = out_features, in_features
        if mode == "bf16":
            self.weight = nn.Parameter(torch.empty(n, k, device=device, dtype=dtype), requires_grad=False)
        elif mode == "fp8":
            self.register_buffer("qdata", torch.empty(n, k, device=device, dtype=torch.float8_e4m3fn))
            self.register_buffer("scale", torch.empty(n, 1, device=device, dtype=torch.float32))
        else:
            self.register_buffer("qdata", torch.empty(n, k // 2, device=device, dtype=torch.uint8))
            self.register_buffer("scale", torch.empty(n, k // 16, device=device, dtype=torch.float8_e4m3fn))
            self.register_buffer("global_scale", torch.empty((), device=device, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, backend: Optional[str] = None) -> "QuantLinear":
        """Quantize `linear`'s weight (once) and take over its bias parameter (shared, not copied)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, mode, linear.bias is not None,
                    backend=backend, device="meta", dtype=w.dtype)
        if mode == "bf16":
            layer.weight = linear.weight
        elif mode == "fp8":
            layer.qdata, layer.scale = fp8.quantize_rowwise(w)
        else:
            q = qb.nvfp4_quantize(w.contiguous(), backend=backend or qb.default_backend(w.device))
            layer.qdata, layer.scale, layer.global_scale = q.data, q.scale, q.global_scale
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    @classmethod
    def concatenated(cls, layers: Sequence["QuantLinear"]) -> "QuantLinear":
        """One layer whose output is the given layers' outputs side by side (weights and biases concatenated
        along N), for layers reading the same input: one activation quantize and one GEMM instead of several.
        Exact for bf16 and fp8 (rowwise: one scale per output row); refused for nvfp4, whose per-tensor global
        scales differ between the layers."""
        first = layers[0]
        if any(m.mode != first.mode or m.in_features != first.in_features or (m.bias is None) != (first.bias is None)
               or m.backend != first.backend for m in layers):
            raise QuantError("concatenated layers need one mode, backend, input size and bias setting")
        if first.mode == "nvfp4":
            raise QuantError("nvfp4 layers cannot be concatenated: each has its own global scale")
        out = cls(first.in_features, sum(m.out_features for m in layers), first.mode, first.bias is not None,
                  backend=first.backend, device="meta")  # placeholders, replaced below
        if first.mode == "bf16":
            out.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers]), requires_grad=False)
        else:
            out.qdata = torch.cat([m.qdata for m in layers])
            out.scale = torch.cat([m.scale for m in layers])
        if first.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
        return out

    # -- weights ---------------------------------------------------------------------------------------------
    def weight_nvfp4(self) -> NVFP4Tensor:
        """The stored NVFP4 weight as an NVFP4Tensor (nvfp4 mode only)."""
        if self.mode != "nvfp4":
            raise QuantError(f"weight_nvfp4() needs mode nvfp4, this layer is {self.mode}")
        return NVFP4Tensor(self.qdata, self.scale, self.global_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by, [N, K] in `dtype`."""
        if self.mode == "bf16":
            return self.weight.detach().to(dtype)
        if self.mode == "fp8":
            return fp8.dequantize(self.qdata, self.scale, dtype)
        return self.weight_nvfp4().dequantize(dtype)

    # -- compute ---------------------------------------------------------------------------------------------
    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        if k != self.in_features:
            raise ValueError(f"QuantLinear expects last dim {self.in_features}, got input {tuple(x.shape)}")
        x2 = x.reshape(-1, k)
        be = self.backend or qb.default_backend(x.device)
        bias = None if self.bias is None else self.bias.detach()
        if self.mode == "fp8":
            xq, xs = qb.fp8_quantize_rowwise(x2, backend=be)
            out = qb.fp8_matmul_rowwise(xq, xs, self.qdata, self.scale, None if bias is None else bias.to(x.dtype),
                                        out_dtype=x.dtype, backend=be)
        else:
            out = qb.nvfp4_linear(x2, self.weight_nvfp4(), bias, out_dtype=x.dtype, backend=be)
        return out.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bf16":
            return F.linear(x, self.weight, self.bias)
        needs_grad = x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            return _StraightThrough.apply(x, self.bias, self)
        return self._gemm(x)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `.to(dtype)`, `.half()` etc. would convert the float8/float32 format buffers: keep their dtype.
        saved = {n: self._buffers[n] for n in _FORMAT_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bias={self.bias is not None}, backend={self.backend or 'auto'}")


# -- whole models -------------------------------------------------------------------------------------------------
@dataclass
class QuantSummary:
    """Which Linear layers of a model are quantized (name -> mode) and which stay in high precision."""

    quantized: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for mode in self.quantized.values():
            out[mode] = out.get(mode, 0) + 1
        out["kept"] = len(self.kept)
        return out

    def __str__(self) -> str:
        c = self.counts()
        done = ", ".join(f"{v} {k}" for k, v in c.items() if k != "kept") or "none"
        return f"quantized linears: {done}; kept in high precision: {c['kept']}"


def quant_summary(model: nn.Module) -> QuantSummary:
    """Summarize a model after `quantize_model` / `load_quantized`: QuantLinear names and modes, and the plain
    `nn.Linear` layers left in high precision (skipped by pattern or by shape)."""
    s = QuantSummary()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            s.quantized[name] = m.mode
        elif isinstance(m, nn.Linear):
            s.kept.append(name)
    return s


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def quantize_model(
    model: nn.Module, mode: str, skip: Sequence[str] = DEFAULT_SKIP, backend: Optional[str] = None
) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by a `QuantLinear` of `mode`, except layers whose name
    matches `skip` (see DEFAULT_SKIP) and layers whose shape the mode cannot take. Returns the model;
    `quant_summary(model)` lists what was quantized and what was kept (`str()` of it gives the counts).
    Mode ``bf16`` wraps the layers without changing their numbers."""
    check_mode(mode)
    if isinstance(model, nn.Linear):
        raise QuantError("quantize_model works in place on a model; use QuantLinear.from_linear for one Linear")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_skipped(n, skip)]
    for name, linear in targets:
        if unsupported_reason(linear.in_features, linear.out_features, mode) is None:
            _set_submodule(model, name, QuantLinear.from_linear(linear, mode, backend))
    return model
