"""Timing helpers shared by the benchmarks: device syncs, freeing a finished variant, timed training steps."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Collect garbage and hand cached GPU memory back, so the next variant starts from an empty GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class StepTiming:
    step_s: float  # wall seconds per timed step
    losses: list[float]
    peak_gib: float | None  # peak GPU memory over the timed steps (None off CUDA)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def time_train_steps(trainer, warmup: int, steps: int) -> StepTiming:
    """`warmup` untimed `trainer.train_step()` calls, then `steps` timed ones (synced before and after)."""
    device = trainer.device
    for _ in range(warmup):
        trainer.train_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [trainer.train_step() for _ in range(steps)]
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return StepTiming(step_s, losses, peak)
