"""Transformer training step speed of the embedded model's stages, and where a step's time goes (GPU; CPU runs).

Each variant is a fresh `Trainer` for one stage's config from configs/embedded (`base`: flow matching, `tf`:
teacher forcing) at one `--batch` size, on a synthetic world: `--clips` clips of random latents shaped as the
world stage writes them (16 channels, 17 latent frames of 16x16, one prompt of the world's grammar each), so no
VAE or world run is needed. It runs `--warmup` steps, times `--steps` more, then profiles one step:
  - step s, examples/s: wall time per step and training examples (clips of the stage's `clip_frames`) a second;
  - GPU busy: the summed time of the profiled step's device kernels over a timed (unprofiled) step's wall time
    (the profiler slows the host, not the kernels; well below 1 means the host's launches and work set the pace);
  - host top: the three CPU operators with the most self time in the profiled step.

    python bench/train_step.py [--stages base,tf] [--batch 128,256] [--warmup 10] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from longstream.bench.timing import release, sync, time_train_steps
from longstream.paths import check_json_option
from longstream.train.data import write_clip
from longstream.train.trainer import TrainConfig, make_trainer
from longstream.train.world import random_scene

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "embedded"
STAGES = ("base", "tf")
LATENT_SHAPE = (16, 17, 16, 16)  # the world stage's 65-frame clips at 128x128 through the 8x VAE


def synthetic_world(root: Path, clips: int) -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for i in range(clips):
        write_clip(root, f"clip_{i:05d}", torch.randn(LATENT_SHAPE, generator=gen),
                   [(random_scene(rng).prompt, 0, LATENT_SHAPE[1])])


def profiled_step(trainer) -> tuple[float, float, list[tuple[str, float]]]:
    """One step under the profiler: its wall seconds, device kernel seconds, and the top host operators."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        trainer.train_step()
        sync(trainer.device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    host = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total,
                  reverse=True)
    return wall, kernel_us / 1e6, [(e.key, e.self_cpu_time_total / 1e6) for e in host[:3]]


def measure(cfg: TrainConfig, warmup: int, steps: int) -> dict:
    trainer = make_trainer(cfg)
    device = trainer.device
    timing = time_train_steps(trainer, warmup, steps)
    step_s = timing.step_s
    wall, kernels, host = profiled_step(trainer)
    del trainer
    release(device)
    return dict(step_s=step_s, examples_per_s=cfg.batch_size / step_s, loss=timing.mean_loss,
                gpu_busy=kernels / step_s if device.type == "cuda" else None, profiled_step_s=wall,
                host_top=host, peak_gib=timing.peak_gib,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="base,tf")
    p.add_argument("--batch", default="128,256", help="batch sizes (comma-separated)")
    p.add_argument("--clips", type=int, default=64, help="synthetic world clips")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    check_json_option(p, a.json, "--json")
    stages = a.stages.split(",")
    if not set(stages) <= set(STAGES):
        p.error(f"--stages takes {', '.join(STAGES)}")
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        p.error("--batch takes comma-separated integers")
    if a.steps < 1 or a.warmup < 0 or a.clips < 1 or min(batches) < 1:
        p.error("--steps, --clips and --batch must be >= 1 and --warmup >= 0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        synthetic_world(world, a.clips)
        for stage, batch in itertools.product(stages, batches):
            cfg = TrainConfig.from_yaml(CONFIGS / f"{stage}.yaml", {
                "data": str(world), "init": None, "output": str(Path(tmp) / f"{stage}-{batch}"),
                "device": a.device, "batch_size": batch, "steps": 10**6, "save_every": 10**6, "max_seconds": 0})
            row = dict(stage=stage, batch=batch, **measure(cfg, a.warmup, a.steps))
            rows.append(row)
            busy = "-" if row["gpu_busy"] is None else f"{row['gpu_busy']:.2f}"
            host = ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in row["host_top"])
            print(f"{stage:4s}  batch {batch:4d}  {row['step_s'] * 1e3:7.1f} ms/step  "
                  f"{row['examples_per_s']:7.0f} examples/s  GPU busy {busy}  host top: {host}", flush=True)
    result = dict(device=rows[-1]["device"], date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  warmup=a.warmup, steps=a.steps, clips=a.clips, rows=rows)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
