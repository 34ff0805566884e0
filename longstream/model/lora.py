"""Low-rank adapters (LoRA) for `CausalWanTransformer` linears, e.g. LongLive-2.0's 4-step -> 2-step LoRA.

A LoRA adds ``scale * B @ A`` to a frozen linear weight ``W`` [out, in]: ``A`` [rank, in], ``B`` [out, rank],
``scale = alpha / rank`` (the reference's 2-step LoRA: rank 128, alpha 128). `inject_lora` wraps the targeted
linears (``nn.Linear`` or a quantized ``QuantLinear``) in `LoRALinear`; the wrapped base layer lives under
``<name>.base`` until `merge_lora` (fold into the weights) or `remove_lora` (drop the adapter) puts a plain layer
back, with the model's original parameter names.

File format (one ``.safetensors`` file), ``<name>`` being a wrapped module's name in the model, i.e. diffusers'
``WanTransformer3DModel`` names such as ``blocks.0.attn1.to_q`` or ``blocks.3.ffn.net.0.proj``:

* tensors: ``<name>.lora_A`` [rank, in_features] and ``<name>.lora_B`` [out_features, rank], in the dtype they
  were trained in (loading casts them to the dtype of the model's LoRA parameters, the base's by default);
* metadata: ``longstream_format`` = "lora/1", ``rank`` and ``alpha`` (decimal strings), ``targets`` = JSON list of
  the glob patterns that chose the layers (informative: loading wraps exactly the layers named by the tensors).

Every problem with a file (unreadable, not a LoRA, layers the model lacks, wrong shapes such as a LoRA made for
another model) raises `LoRAError` with one line naming the file and the first problems.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.linear import QuantLinear
from ..safetensors_io import save_atomic
from .checkpoints import CheckpointError, check_state_dict, read_safetensors

FORMAT = "lora/1"

# Attention projections (self and cross) and FFN linears of every block; conditioning embedders, patch embedding
# and output head stay untouched. fnmatch patterns over full module names ("*" also matches dots).
DEFAULT_TARGETS: tuple[str, ...] = (
    "blocks.*.attn1.to_q",
    "blocks.*.attn1.to_k",
    "blocks.*.attn1.to_v",
    "blocks.*.attn1.to_out.0",
    "blocks.*.attn2.to_q",
    "blocks.*.attn2.to_k",
    "blocks.*.attn2.to_v",
    "blocks.*.attn2.to_out.0",
    "blocks.*.ffn.net.0.proj",
    "blocks.*.ffn.net.2",
)


class LoRAError(CheckpointError):
    """A LoRA that cannot be injected, loaded, saved or merged; the message names the file or layer at fault."""


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha (scale = alpha / rank), target patterns and dropout (on the adapter's input, training only)."""

    rank: int = 128
    alpha: float = 128.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if int(self.rank) != self.rank or self.rank <= 0:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LoRAError("LoRA targets are empty")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


Base = nn.Linear | QuantLinear


def _base_dtype(base: Base) -> torch.dtype:
    """The dtype LoRA parameters take by default: the base weight's (or bias's, for quantized weights)."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    if base.bias is not None:
        return base.bias.dtype
    return torch.float32


def _base_device(base: Base) -> torch.device:
    return next(t.device for t in [*base.parameters(), *base.buffers()])


def _delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A in float32 (the one formula every merge uses, so all merges agree bitwise)."""
    return (lora_b.detach().float() @ lora_a.detach().float()) * scale


def _is_quantized(base: Base) -> bool:
    return isinstance(base, QuantLinear) and base.mode != "bf16"


class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ A^T) @ B^T`` over a frozen `nn.Linear` or `QuantLinear` base.

    ``lora_A`` [rank, in] starts kaiming-uniform, ``lora_B`` [out, rank] starts at zero, so a fresh adapter
    leaves the output unchanged. The adapter runs in the input's dtype; its output is added in the base output's.
    """

    def __init__(
        self,
        base: Base,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise LoRAError(f"LoRALinear wraps nn.Linear or QuantLinear, not {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        device, dtype = _base_device(base), dtype or _base_dtype(base)
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, device=device, dtype=dtype))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        """A kaiming-uniform (as nn.Linear initializes weights), B zero."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (unmerged), so code that reads `layer.weight.dtype` keeps working."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return y + (F.linear(h, self.lora_B.to(x.dtype)) * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, [out, in] in float32."""
        return _delta(self.lora_A, self.lora_B, self.scale)

    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W + scale * B @ A (a quantized base is dequantized), in `dtype` (default: the base dtype)."""
        if isinstance(self.base, QuantLinear):
            w = self.base.dequantized_weight(torch.float32)
        else:
            w = self.base.weight.detach().float()
        return (w + self.delta_weight()).to(dtype or _base_dtype(self.base))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


# -- model-level -------------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targetable(model: nn.Module) -> dict[str, nn.Module]:
    """Linears (and already wrapped ones) by name, not counting the bases inside LoRALinear."""
    out: dict[str, nn.Module] = {}
    inside = set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, LoRALinear):
            inside.add(name)
            out[name] = m
        elif isinstance(m, (nn.Linear, QuantLinear)):
            out[name] = m
    return out


def _match(names: Iterable[str], targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names matching any pattern, patterns matching no name)."""
    names = list(names)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in targets)]
    unused = [pat for pat in targets if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    return chosen, unused


def _wrap(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float,
          dtype: Optional[torch.dtype]) -> None:
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, LoRALinear):
            if m.rank != rank:
                raise LoRAError(f"{name} already has a LoRA of rank {m.rank}, cannot add one of rank {rank}")
            m.alpha, m.scale = float(alpha), float(alpha) / m.rank
            continue
        _set_submodule(model, name, LoRALinear(m, rank, alpha, dropout, dtype))


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad on LoRA parameters only."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")) or name in ("lora_A", "lora_B"))


def inject_lora(
    model: nn.Module,
    config: LoRAConfig = LoRAConfig(),
    *,
    freeze: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> list[str]:
    """Wrap every `nn.Linear` / `QuantLinear` whose module name matches `config.targets` in a `LoRALinear`
    (in place) and return the wrapped names. With `freeze` (default) every non-LoRA parameter of the model is
    frozen. Layers already wrapped with the same rank are kept (their A/B untouched). Raises LoRAError when a
    pattern matches no linear layer (a typo, or a non-linear module). `dtype`: of A/B (default: the base's)."""
    candidates = _targetable(model)
    names, unused = _match(candidates, config.targets)
    if unused:
        raise LoRAError(
            f"LoRA target pattern(s) {', '.join(map(repr, unused))} match no nn.Linear/QuantLinear of the model"
        )
    _wrap(model, names, config.rank, config.alpha, config.dropout, dtype)
    if freeze:
        mark_only_lora_trainable(model)
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors: ``<module>.lora_A`` and ``<module>.lora_B`` (detached, not copied)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in _lora_modules(model).items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = m.lora_A.detach()
        out[prefix + "lora_B"] = m.lora_B.detach()
    return out


def save_lora(model: nn.Module, path: str | Path, config: Optional[LoRAConfig] = None) -> None:
    """Write the model's LoRA tensors atomically (a temporary file beside the target, then rename). Rank and alpha
    come from the modules (all must agree, and agree with `config` when given); `targets` from `config`, else the
    wrapped layer names."""
    path = Path(path)
    modules = _lora_modules(model)
    if not modules:
        raise LoRAError(f"{path}: the model has no LoRA layers to save")
    ranks = {(m.rank, m.alpha) for m in modules.values()}
    if len(ranks) > 1:
        raise LoRAError(f"{path}: the model's LoRA layers differ in rank/alpha {sorted(ranks)}; one file has one")
    rank, alpha = ranks.pop()
    if config is not None and (config.rank, config.alpha) != (rank, alpha):
        raise LoRAError(
            f"{path}: config says rank {config.rank} alpha {config.alpha:g}, the model's LoRA has rank {rank} "
            f"alpha {alpha:g}"
        )
    targets = list(config.targets) if config is not None else sorted(modules)
    metadata = {"longstream_format": FORMAT, "rank": str(rank), "alpha": repr(alpha), "targets": json.dumps(targets)}
    save_atomic(lora_state_dict(model), path, metadata)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """Tensors and config of a LoRA file, checked for format and self-consistency (no model needed)."""
    try:
        state, metadata = read_safetensors(path)
    except CheckpointError as exc:
        raise LoRAError(str(exc)) from None
    fmt = metadata.get("longstream_format")
    if fmt != FORMAT:
        raise LoRAError(f"{path}: not a longstream LoRA file (format {fmt!r}, expected {FORMAT!r})")
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        targets = json.loads(metadata.get("targets", "[]")) or ["*"]
        config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(targets))
    except (KeyError, ValueError, TypeError) as exc:
        raise LoRAError(f"{path}: bad LoRA metadata ({exc})") from None
    modules = _modules_of(path, state)
    if not modules:
        raise LoRAError(f"{path}: the LoRA file holds no tensors")
    for name in modules:
        a, b = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise LoRAError(
                f"{path}: {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank {rank}"
            )
    return state, config


def _modules_of(path: str | Path, state: dict[str, torch.Tensor]) -> list[str]:
    """Module names of a LoRA state dict; every module needs both lora_A and lora_B."""
    bad = [k for k in state if not k.endswith((".lora_A", ".lora_B"))]
    if bad:
        raise LoRAError(f"{path}: not a LoRA tensor name: {', '.join(sorted(bad)[:3])}")
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    half = [f"{n}.{s}" for n in names for s in ("lora_A", "lora_B") if f"{n}.{s}" not in state]
    if half:
        raise LoRAError(f"{path}: missing {len(half)}: {', '.join(half[:3])}")
    return names


def load_lora(model: nn.Module, path: str | Path, *, freeze: bool = True) -> LoRAConfig:
    """Load a LoRA file into `model`, wrapping the layers it names where they are not wrapped yet (strict: the
    model's LoRA layers must be exactly the file's, with matching shapes). The whole file is checked before the
    model changes. Returns the file's config; with `freeze`, only LoRA parameters stay trainable."""
    state, config = read_lora(path)
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    candidates = _targetable(model)
    expected: dict[str, torch.Tensor] = {}
    for name, m in candidates.items():
        if isinstance(m, LoRALinear):
            expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = m.lora_A, m.lora_B
        elif name in names:
            expected[f"{name}.lora_A"] = torch.empty(config.rank, m.in_features, device="meta")
            expected[f"{name}.lora_B"] = torch.empty(m.out_features, config.rank, device="meta")
    try:
        check_state_dict(path, state, expected)
    except CheckpointError as exc:
        raise LoRAError(str(exc).replace("does not fit the model", "LoRA does not fit the model")) from None
    _wrap(model, names, config.rank, config.alpha, config.dropout, None)
    modules = _lora_modules(model)
    with torch.no_grad():
        for name in names:
            modules[name].lora_A.copy_(state[f"{name}.lora_A"])
            modules[name].lora_B.copy_(state[f"{name}.lora_B"])
    if freeze:
        mark_only_lora_trainable(model)
    return config


def merge_lora(model: nn.Module) -> list[str]:
    """Fold scale * B @ A into each wrapped base weight and put the plain base layer back (in place; parameter
    names become the base model's again). Returns the merged names. A base with quantized weights (QuantLinear
    fp8/nvfp4) is refused before anything changes: merging would need re-quantization, which would also lose the
    adapter's small update in the rounding; merge the high-precision checkpoint (`merge_lora_file`), then
    quantize. A bf16-mode QuantLinear merges like an nn.Linear."""
    modules = _lora_modules(model)
    quantized = [f"{n} ({m.base.mode})" for n, m in modules.items() if _is_quantized(m.base)]
    if quantized:
        raise LoRAError(
            f"cannot merge a LoRA into quantized weights ({len(quantized)} layers, e.g. {quantized[0]}): it would "
            f"need re-quantization; merge into the high-precision checkpoint (merge_lora_file), then quantize"
        )
    with torch.no_grad():
        for name, m in modules.items():
            m.base.weight.copy_(m.merged_weight(m.base.weight.dtype))
            _set_submodule(model, name, m.base)
    return list(modules)


def remove_lora(model: nn.Module) -> list[str]:
    """Drop every adapter, putting the unchanged base layers back (in place). Returns the names. Parameters
    frozen by `inject_lora` stay frozen."""
    modules = _lora_modules(model)
    for name, m in modules.items():
        _set_submodule(model, name, m.base)
    return list(modules)


def merge_lora_file(base_state_dict: dict[str, torch.Tensor], lora_path: str | Path) -> dict[str, torch.Tensor]:
    """A new state dict: `base_state_dict` with every LoRA of the file folded into ``<name>.weight`` (in that
    weight's dtype); other tensors are shared, not copied. Raises LoRAError naming the file when a layer is
    missing from the base, is quantized (no ``.weight``) or has another shape. Same numbers as `merge_lora`."""
    state, config = read_lora(lora_path)
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    missing, shapes = [], []
    for name in names:
        w = base_state_dict.get(f"{name}.weight")
        if w is None:
            hint = " (quantized?)" if f"{name}.qdata" in base_state_dict else ""
            missing.append(f"{name}.weight{hint}")
            continue
        want = (state[f"{name}.lora_B"].shape[0], state[f"{name}.lora_A"].shape[1])
        if tuple(w.shape) != want:
            shapes.append(f"{name}.weight {tuple(w.shape)} != LoRA {want}")
    problems = []
    for label, items in (("missing in the base", missing), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label} {len(items)}: {', '.join(items[:3])}{more}")
    if problems:
        raise LoRAError(f"{lora_path}: LoRA does not fit the base model: {'; '.join(problems)}")
    merged = dict(base_state_dict)
    for name in names:
        w = base_state_dict[f"{name}.weight"]
        a, b = state[f"{name}.lora_A"].to(w.device), state[f"{name}.lora_B"].to(w.device)
        merged[f"{name}.weight"] = (w.float() + _delta(a, b, config.scale)).to(w.dtype)
    return merged
