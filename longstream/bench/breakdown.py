"""Where a profiled chunk's time went: labels put on the model for torch.profiler, and the attribution of the
profile to linears, attention, the cache-writing pass, the VAE and the rest (method: `longstream.bench.e2e`'s
docstring)."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import record_function

from ..model.transformer import CausalWanTransformer
from ..pipeline.stream import StreamingGenerator
from ..quant.linear import QuantLinear

LINEARS, ATTENTION, CACHE_WRITE, VAE = "linears", "attention", "cache_write", "vae"
LABELS = {f"longstream.{name}": name for name in (LINEARS, ATTENTION, CACHE_WRITE, VAE)}  # profiler label -> category
LABEL = {name: label for label, name in LABELS.items()}  # category -> profiler label
LINEAR_OPS = {"aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::_scaled_mm"}


def labelled(label: str, fn: Callable) -> Callable:
    """`fn` run inside a profiler range named `label`."""

    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def labels(model: CausalWanTransformer, detail: bool) -> Iterator[None]:
    """Label the cache-writing pass and (with `detail`) every linear for the profiler; undone on exit."""
    saved: list[tuple[object, str, object]] = []
    missing = object()

    def patch(obj: object, name: str, fn: Callable) -> None:
        saved.append((obj, name, vars(obj).get(name, missing)))
        setattr(obj, name, fn)

    forward_stream = model.forward_stream

    def pass_(*args, **kwargs):
        need_output = kwargs.get("need_output", args[5] if len(args) > 5 else True)
        if need_output:
            return forward_stream(*args, **kwargs)
        with record_function(LABEL[CACHE_WRITE]):
            return forward_stream(*args, **kwargs)

    patch(model, "forward_stream", pass_)
    if detail:
        for module in model.modules():
            if isinstance(module, (nn.Linear, QuantLinear)):
                patch(module, "forward", labelled(LABEL[LINEARS], module.forward))
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def label_attention(gen: StreamingGenerator) -> None:
    """Make `gen`'s caches label their attention calls."""
    new_cache = gen.new_cache

    def labelled_cache(batch: int):
        cache = new_cache(batch)
        cache.attend = labelled(LABEL[ATTENTION], cache.attend)
        return cache

    gen.new_cache = labelled_cache


def _category(name: str) -> str | None:
    if name in LABELS:
        return LABELS[name]
    if name in LINEAR_OPS:
        return LINEARS
    if "scaled_dot_product" in name or "attention_forward" in name:
        return ATTENTION
    return None


def _own_kernel_us(event) -> float:
    return sum(k.duration for k in event.kernels if k.name not in LABELS)  # GPU user-annotation spans left out


def _kernel_us(event, seen: set[int]) -> float:
    """Summed duration of the kernels launched inside a profiler event. torch.profiler hands the kernels of one
    correlation id to every CPU event with that id (nested ops can share one), so each id counts once (`seen`)."""
    own = 0.0
    if event.id not in seen:
        seen.add(event.id)
        own = _own_kernel_us(event)
    return own + sum(_kernel_us(child, seen) for child in event.cpu_children)


def breakdown(events: Sequence, wall_s: float, on_gpu: bool) -> dict[str, float | None]:
    """Per-category time (ms) of a profiled chunk: the outermost labelled or recognised event of each call
    tree counts (kernel time on a GPU, wall time on a CPU); `other` is the rest of `wall_s`. On a GPU also
    `kernels`, all kernel time, and `unlinked`, kernel time that the profiler tied to no CPU event (so no category
    could claim it: it lands in `other`)."""
    totals = dict.fromkeys((LINEARS, ATTENTION, CACHE_WRITE, VAE), 0.0)
    seen: set[int] = set()

    def visit(event) -> None:
        category = _category(event.name)
        if category is None:
            for child in event.cpu_children:
                visit(child)
        else:
            totals[category] += (_kernel_us(event, seen) if on_gpu else event.cpu_time_total) / 1000

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    for event in cpu:
        if event.cpu_parent is None:
            visit(event)
    chunk = wall_s * 1000
    kernels = unlinked = shared = None
    if on_gpu:
        kernels = sum(e.time_range.elapsed_us() for e in events
                      if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1000
        linked = {e.id: _own_kernel_us(e) for e in cpu}  # one entry per correlation id
        unlinked = kernels - sum(linked.values()) / 1000
        ids = Counter(e.id for e in cpu if getattr(e, "linked_correlation_id", 0) == 0)
        shared = sum(n for n in ids.values() if n > 1)
    return {**totals, "other": chunk - sum(totals.values()), "chunk": chunk, "kernels": kernels, "unlinked": unlinked,
            "shared_ids": shared}


def top_kernels(events: Sequence, count: int) -> list[dict[str, Any]]:
    """The `count` GPU kernels (by name) with the most summed time: name (cut to 100 characters), ms, calls."""
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.device_type != DeviceType.CPU and not e.is_user_annotation:
            entry = totals.setdefault(e.name[:100], [0.0, 0])
            entry[0] += e.time_range.elapsed_us() / 1000
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:count]
    return [{"name": name, "ms": ms, "calls": calls} for name, (ms, calls) in ranked]


def consistent(parts: dict[str, float | None]) -> bool:
    """False when the kernel time tied to CPU events exceeds all kernel time by over 1% (negative `unlinked`):
    some kernels were then counted under several events, and the GPU breakdown cannot be trusted."""
    return parts.get("unlinked") is None or parts["unlinked"] >= -0.01 * parts["kernels"]
