"""Compiled elementwise steps on CUDA: `run(fn, x, ...)` calls `torch.compile(fn)` or, where that does not apply,
`fn` itself (the eager reference twin).

Used for chains of norm / modulation / RoPE / residual arithmetic that eager PyTorch runs as several float32
passes over the tensor: compiled, each becomes one kernel that reads its inputs once. Compiled results equal the
eager ones up to float rounding order (Inductor may keep float32 intermediates where eager rounds to bf16). Only
CUDA inference takes the compiled path; CPU tensors, and anything recorded by autograd, run eagerly.
`fusion(False)` turns it off (the benchmarks' eager reference). A function meets one graph per input rank,
dtype and constant argument (the VAE's norm: ~10), so the recompile limit is raised to RECOMPILE_LIMIT here.
Dynamo is not thread-safe (a call on one thread while another traces fails), and generate calls compiled
functions from its decode worker too, so compiled calls take one lock (they only launch kernels: it is held briefly
except while compiling).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Callable, Iterator

import torch

RECOMPILE_LIMIT = 64  # graphs per compiled function
COMPILED_DEVICES = ("cuda",)  # device types whose tensors take the compiled path
_ENABLED = [True]
_FAILED: set[Callable] = set()  # functions whose compilation failed: eager from then on
_DYNAMO = threading.Lock()  # one thread in compiled code at a time


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Within the block, use (or not) the compiled functions on CUDA: a process-wide switch (every thread)."""
    saved = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = saved


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True)


def serialized(fn: Callable) -> Callable:
    """`fn` (a `torch.compile`d callable run on one thread while others call `run`) under the same lock."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with _DYNAMO:
            return fn(*args, **kwargs)
    return call


def compiles(x: torch.Tensor) -> bool:
    """Whether `run(fn, x, ...)` takes the compiled path."""
    # inside an outer torch.compile (bench e2e --compile), the eager twin is traced into the outer graph
    return (_ENABLED[0] and x.device.type in COMPILED_DEVICES and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def run(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """`fn(x, *args)`, compiled when x is on CUDA, fusion is on and no gradient is being recorded. If compiling
    fails (no Triton or C compiler here, say), it warns once and runs `fn` eagerly from then on."""
    if compiles(x) and fn not in _FAILED:
        try:
            limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
            with _DYNAMO, torch._dynamo.config.patch(recompile_limit=limit):
                return _compiled(fn)(x, *args)
        except Exception as exc:  # noqa: BLE001  the eager twin below is the fallback (and re-raises real errors)
            _FAILED.add(fn)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.warn(f"longstream: compiling {fn.__name__} failed ({first}); it runs eagerly", stacklevel=2)
    return fn(x, *args)
