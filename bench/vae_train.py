"""VAE training step speed by precision and layout (the embedded model's two VAE stages; GPU, CPU for a check).

Each variant is a fresh `VAETrainer` (the stage's config from configs/embedded with the next run's overrides)
with one of `--precision` fp32 (TF32 convolutions, the default) / bf16 (`vae_autocast`) and `--layout` ncdhw /
channels-last (`channels_last`). It runs `--warmup` steps (cuDNN's autotuning, compiled norms), then times
`--steps` more: the same steps, so the same clips and warm-up depths, in every variant. Stages:
  stage1: `vae.yaml` (16 clips of 5 frames at 128x128), width 24, object weight 9;
  stage2: `vae_long.yaml` as the deep run sets it (8 clips of 129 frames, 64x64 crops, warm-up depth up to 28)
    on a new width-24 VAE.
Reports seconds per step, TFLOP/s (forward + backward FLOPs of a whole-clip step, counted once per stage with
torch's FlopCounterMode; stage 2's steps with a warm-up depth do less, so its figure is an upper bound), the
speed-up over the stage's first variant, peak GPU memory and the mean loss of the timed steps. bf16 needs a CUDA
device (`vae_autocast`).

    python bench/vae_train.py [--stages stage1,stage2] [--precision fp32,bf16] [--layout ncdhw,channels-last]
        [--warmup 8] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from longstream.bench.timing import release, time_train_steps
from longstream.devices import resolve_device
from longstream.paths import check_json_option
from longstream.train.trainer import TrainConfig, make_trainer
from longstream.train.vae_objective import vae_loss, world_videos

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "embedded"
STAGES = {  # config file and the settings the next run overrides (docs/embedded.md, "What it needs next")
    "stage1": ("vae.yaml", dict(vae_width=24, object_weight=9.0)),
    "stage2": ("vae_long.yaml", dict(init=None, vae_width=24, object_weight=9.0, clip_frames=129, batch_size=8,
                                     stream_warmup=28)),
}


def config(stage: str, precision: str, layout: str, out: str, device: str) -> TrainConfig:
    name, overrides = STAGES[stage]
    return TrainConfig.from_yaml(CONFIGS / name, {
        **overrides, "output": out, "device": device, "steps": 10**6, "save_every": 10**6, "max_seconds": 0,
        "vae_autocast": precision == "bf16", "channels_last": layout == "channels-last"})


def step_flops(trainer) -> float:
    """Forward + backward FLOPs of one step at warm-up depth 0 (the whole clip trained), counted on the trainer's
    device (its gradients are cleared by the next step)."""
    cfg = trainer.cfg
    video = world_videos(cfg.seed, 0, 0, cfg.batch_size, cfg.clip_frames, trainer.preset.height, cfg.crop,
                         trainer.device)
    with FlopCounterMode(display=False) as counter:
        vae_loss(trainer.model, video, kl_weight=cfg.kl_weight, object_weight=cfg.object_weight).backward()
    return float(counter.get_total_flops())


def measure(cfg: TrainConfig, warmup: int, steps: int, count_flops: bool) -> dict:
    """Seconds per timed step, their mean loss, peak GPU memory, and (with `count_flops`) FLOPs per step."""
    trainer = make_trainer(cfg)
    device = trainer.device
    flops = step_flops(trainer) if count_flops else None
    timing = time_train_steps(trainer, warmup, steps)
    del trainer
    release(device)
    return dict(step_s=timing.step_s, loss=timing.mean_loss, peak_gib=timing.peak_gib, flops=flops,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="stage1,stage2")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--layout", default="ncdhw,channels-last")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    check_json_option(p, a.json, "--json")  # before any work
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if "bf16" in a.precision.split(",") and resolve_device(a.device).type != "cuda":
        p.error("--precision bf16 (vae_autocast) needs a CUDA device")
    stages, precisions, layouts = (a.stages.split(","), a.precision.split(","), a.layout.split(","))
    for values, allowed, flag in ((stages, STAGES, "--stages"), (precisions, ("fp32", "bf16"), "--precision"),
                                  (layouts, ("ncdhw", "channels-last"), "--layout")):
        if not set(values) <= set(allowed):
            p.error(f"{flag} takes {', '.join(allowed)}")
    rows, flops = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage, precision, layout in itertools.product(stages, precisions, layouts):
            cfg = config(stage, precision, layout, str(Path(tmp) / f"{stage}-{precision}-{layout}"), a.device)
            row = dict(stage=stage, precision=precision, layout=layout,
                       **measure(cfg, a.warmup, a.steps, count_flops=stage not in flops))
            flops.setdefault(stage, row.pop("flops"))
            row["tflops"] = flops[stage] / row["step_s"] / 1e12
            row["speedup"] = next((r for r in rows if r["stage"] == stage), row)["step_s"] / row["step_s"]
            rows.append(row)
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            print(f"{stage}  {precision:4s}  {layout:13s}  {row['step_s']:.3f} s/step  {row['tflops']:6.2f} TFLOP/s  "
                  f"x{row['speedup']:.2f}  peak {peak} GiB  loss {row['loss']:.4f}", flush=True)
    result = dict(device=rows[-1]["device"], date=time.strftime("%Y-%m-%d"), torch=torch.__version__, warmup=a.warmup,
                  steps=a.steps, stages=STAGES, tflop_per_step={k: v / 1e12 for k, v in flops.items()}, rows=rows)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
