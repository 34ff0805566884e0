"""Training linears with quantized GEMMs: NVFP4 (all three GEMMs) and FP8 (E4M3 rowwise).

Notation: X [M, K] (M tokens: all leading dims flattened), W [N, K] the master weight (float32 or bf16; the
parameter itself is never quantized in place), dY [M, N].

NVFP4 recipe (NVIDIA's NVFP4 training, arXiv 2509.25149, as LongLive-2.0 trains):

    fprop  Y  = Q(X) Q2(W)^T                  reduction over K
    dgrad  dX = Qg(dY) Q2(W^T)^T              reduction over N; Q2(W^T) = Q2(W).transpose(), same codes/scales
    wgrad  dW = Qg(H(dY^T)) Q(H(X^T))^T       reduction over M (tokens)

* Q: NVFP4 with 1x16 blocks along the reduction dim, round to nearest even (``backend.nvfp4_quantize``).
* Q2: NVFP4 with 16x16 2D blocks (``nvfp4.quantize(block=(16, 16))``), so W and W^T share codes and scales and
  fprop and dgrad see the same quantized weight. Needs K and N multiples of 16.
* Qg: gradients with stochastic rounding (reference codec, ``generator``), or RNE if ``stochastic=False``.
* H: random Hadamard transform on 16-blocks of the token dim (``hadamard.py``), the same signs for both wgrad
  operands; H is orthogonal, so it cancels in exact math and only changes what the quantizer sees.
* Tokens are zero-padded to a multiple of 16 for wgrad (zero tokens add nothing, and leave every amax as is).
* Random numbers (stochastic rounding) are drawn from ``generator`` (default: torch's global generator on the
  tensor's device) in this order: dgrad's Qg(dY) [M, N], then wgrad's Qg(H(dY^T)) [N, M_padded]. A GEMM whose
  result is not needed (input or weight without grad) draws nothing.
* GEMMs: ``backend.nvfp4_matmul`` (dequantize-to-fp32 emulation on CPU; the same numbers on any backend up to
  summation order). Y and dX come out in X's dtype, dW in W's dtype; the bias gradient is summed in float32.
* ``quantize=False`` turns every Q into the identity (GEMMs in float32, float64 for float64 inputs) while keeping
  H: an ablation/test switch that shows H cancelling.

FP8 recipe (E4M3 everywhere, rowwise scales along each GEMM's reduction dim, round to nearest even):

    fprop  Y  = Q(X) Q(W)^T          X per token, W per output channel
    dgrad  dX = Q(dY) Q(W^T)^T       dY per token, W^T per input channel
    wgrad  dW = Q(dY^T) Q(X^T)^T     dY^T per output channel, X^T per input channel, tokens padded to 16

E4M3 for gradients too (TransformerEngine's "hybrid" recipe would use E5M2): rowwise scales give each row its own
range, which is what E5M2's wider exponent buys with per-tensor scales. GEMMs via ``backend.fp8_matmul_rowwise``.

Both save the high-precision input (not a quantized copy) for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as qb
from . import fp8, hadamard, nvfp4
from .linear import DEFAULT_SKIP, QuantError, _set_submodule, is_skipped
from .nvfp4 import NVFP4Tensor

TRAINING_MODES = ("bf16", "fp8", "nvfp4")


@dataclass(frozen=True)
class NVFP4TrainingConfig:
    """Switches of the NVFP4 recipe (defaults = the recipe)."""

    stochastic: bool = True  # stochastic rounding of gradients; False = RNE everywhere (bit-reproducible)
    hadamard: bool = True  # random Hadamard transform on the wgrad operands
    hadamard_seed: int = 0  # seed of the transform's random signs
    quantize: bool = True  # False: no quantization at all (ablation / tests)
    backend: Optional[str] = None  # None: backend.default_backend(device)


def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """Zero-pad dim 0 of a 2D tensor to a multiple of `multiple`."""
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _rht(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Random Hadamard transform on 16-blocks of the last dim; float64 stays float64, else float32."""
    if t.dtype == torch.float64:
        m = hadamard.rht_matrix(seed, torch.float64, t.device)
        return (t.reshape(*t.shape[:-1], -1, hadamard.BLOCK) @ m).reshape(t.shape)
    return hadamard.random_hadamard(t.float(), seed)


def _hp(*ts: torch.Tensor) -> torch.dtype:
    """Compute dtype of the unquantized path: float64 if any operand is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


class _NVFP4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                cfg: NVFP4TrainingConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        be = cfg.backend or qb.default_backend(x.device)
        if cfg.quantize:
            wq = nvfp4.quantize(weight.detach(), block=(16, 16))
            xq = qb.nvfp4_quantize(x2.contiguous(), backend=be)
            y = qb.nvfp4_matmul(xq, wq, out_dtype=x.dtype, backend=be)
            ctx.save_for_backward(x2, wq.data, wq.scale, wq.global_scale)
        else:
            dt = _hp(x, weight)
            y = (x2.to(dt) @ weight.detach().to(dt).t()).to(x.dtype)
            ctx.save_for_backward(x2, weight.detach())
        if bias is not None:
            y = y + bias.detach().to(y.dtype)
        ctx.cfg, ctx.generator, ctx.be = cfg, generator, be
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cfg, gen, be = ctx.cfg, ctx.generator, ctx.be
        x2, *saved = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])

        def q_grad(t: torch.Tensor) -> NVFP4Tensor:
            if cfg.stochastic:
                return nvfp4.quantize(t, rounding="stochastic", generator=gen)
            return qb.nvfp4_quantize(t.contiguous(), backend=be)

        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dgrad
            if cfg.quantize:
                wq_t = NVFP4Tensor(*saved, block=(16, 16)).transpose()  # [K, N], blocks along N
                dx = qb.nvfp4_matmul(q_grad(dy2), wq_t, out_dtype=x2.dtype, backend=be)
            else:
                dt = _hp(dy2, saved[0])
                dx = (dy2.to(dt) @ saved[0].to(dt)).to(x2.dtype)
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # wgrad, reduction over tokens
            a = _pad_rows(dy2).t()  # [N, Mp]
            b = _pad_rows(x2).t()  # [K, Mp]
            if cfg.hadamard:
                a, b = _rht(a, cfg.hadamard_seed), _rht(b, cfg.hadamard_seed)
            if cfg.quantize:
                bq = qb.nvfp4_quantize(b.contiguous(), backend=be)
                dw = qb.nvfp4_matmul(q_grad(a.contiguous()), bq, out_dtype=ctx.w_dtype, backend=be)
            else:
                dt = _hp(a, b)
                dw = (a.to(dt) @ b.to(dt).t()).to(ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                backend: Optional[str]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        be = backend or qb.default_backend(x.device)
        xq, xs = fp8.quantize_rowwise(x2)
        wq, ws = fp8.quantize_rowwise(weight.detach())
        b = None if bias is None else bias.detach().to(x.dtype)
        y = qb.fp8_matmul_rowwise(xq, xs, wq, ws, b, out_dtype=x.dtype, backend=be)
        ctx.save_for_backward(x2, weight.detach())
        ctx.be, ctx.x_shape, ctx.w_dtype = be, x.shape, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        be = ctx.be
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dX [M, K] = dY [M, N] . W^T [K, N] rows
            gq, gs = fp8.quantize_rowwise(dy2)
            wq, ws = fp8.quantize_rowwise(w.t().contiguous())
            dx = qb.fp8_matmul_rowwise(gq, gs, wq, ws, out_dtype=x2.dtype, backend=be).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dW [N, K] = dY^T [N, Mp] . X^T [K, Mp] rows
            aq, as_ = fp8.quantize_rowwise(_pad_rows(dy2).t().contiguous())
            bq, bs = fp8.quantize_rowwise(_pad_rows(x2).t().contiguous())
            dw = qb.fp8_matmul_rowwise(aq, as_, bq, bs, out_dtype=ctx.w_dtype, backend=be)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.b_dtype)
        return dx, dw, db, None


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 config: NVFP4TrainingConfig = NVFP4TrainingConfig(),
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Functional NVFP4 training linear ``x @ weight^T + bias`` (see the module docstring)."""
    return _NVFP4LinearFn.apply(x, weight, bias, config, generator)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """Functional FP8 (E4M3 rowwise) training linear ``x @ weight^T + bias``."""
    return _FP8LinearFn.apply(x, weight, bias, backend)


class _TrainingLinear(nn.Linear):
    """nn.Linear with quantized GEMMs; same parameters and state-dict names as nn.Linear."""

    mode = "bf16"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> None:
        if in_features % 16 or out_features % 16:
            raise QuantError(f"{self.mode} training linear needs in/out features multiples of 16, "
                             f"got {out_features}x{in_features}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "_TrainingLinear":
        """Wrap `linear`, sharing its parameters (optimizer state stays valid)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer


class NVFP4TrainingLinear(_TrainingLinear):
    """Linear whose fprop, dgrad and wgrad GEMMs run on NVFP4 operands (module docstring). `generator` drives
    stochastic rounding (None: torch's global generator)."""

    mode = "nvfp4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None, *,
                 config: NVFP4TrainingConfig = NVFP4TrainingConfig(),
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config, self.generator = config, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NVFP4LinearFn.apply(x, self.weight, self.bias, self.config, self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode=nvfp4, {self.config}"


class FP8TrainingLinear(_TrainingLinear):
    """Linear whose three GEMMs run on E4M3 operands with rowwise scales (module docstring)."""

    mode = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode=fp8"


def convert_for_training(
    model: nn.Module,
    mode: str = "nvfp4",
    skip: Sequence[str] = DEFAULT_SKIP,
    *,
    config: NVFP4TrainingConfig = NVFP4TrainingConfig(),
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Swap the model's `nn.Linear` layers (in place, parameters shared) for NVFP4 or FP8 training linears, except
    names matching `skip` (DEFAULT_SKIP: conditioning and output projections stay high precision, as in the
    reference) and shapes that are not multiples of 16. Mode ``bf16`` changes nothing. Returns the model;
    `training_summary(model)` says what was converted. One `generator` is shared by all NVFP4 layers."""
    if mode not in TRAINING_MODES:
        raise QuantError(f"unknown training mode {mode!r}; choose one of {', '.join(TRAINING_MODES)}")
    if mode == "bf16":
        return model
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and not is_skipped(n, skip)
               and m.in_features % 16 == 0 and m.out_features % 16 == 0]
    for name, linear in targets:
        if mode == "nvfp4":
            new = NVFP4TrainingLinear.from_linear(linear, config=config, generator=generator)
        else:
            new = FP8TrainingLinear.from_linear(linear, backend=config.backend)
        _set_submodule(model, name, new)
    return model


def training_summary(model: nn.Module) -> dict[str, list[str]]:
    """Names of the model's Linear layers by training mode ('nvfp4', 'fp8', 'bf16' = plain nn.Linear)."""
    out: dict[str, list[str]] = {m: [] for m in TRAINING_MODES}
    for name, m in model.named_modules():
        if isinstance(m, _TrainingLinear):
            out[m.mode].append(name)
        elif isinstance(m, nn.Linear):
            out["bf16"].append(name)
    return out
