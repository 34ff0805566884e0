"""Sequence-parallel teacher-forcing training step: time and peak memory, one row per (frames, layout, GEMM mode).

    torchrun --nproc-per-node N bench/sp_training.py --preset wan2.2-ti2v-5b --frames 128,256 \
        --layout balanced,naive --gemm bf16,fp8,nvfp4 --json train_spN.json

What runs: the distributed trainer's step (`longstream.train.distributed.ParallelTraining`, as `Trainer.train_step`
calls it with `objective: teacher_forcing`, dp = 1, sp = N): AR teacher forcing over [clean, noisy] latent frames,
the ranks' frames given by the SP layout (`balanced`: `BalancedLayout`, what the trainer uses; `naive`: the
contiguous split of `NaiveLayout`), self-attention through Ulysses all-to-alls with the teacher-forcing mask,
then the loss all-reduce, backward, the gradient all-reduce over SP and AdamW. The model is the preset's
transformer (optionally only its first --layers blocks) with seeded random fp32 weights, converted by
`convert_for_training` to the row's GEMM mode; with bf16 on a GPU the forward runs under bf16 autocast, as in the
trainer. Inputs are synthetic: one clip (--batch clips) of seeded `randn` latents of --frames latent frames at the
preset's resolution (or --height/--width) and --text-tokens random text-embedding tokens.

Per row: --warmup steps, then --steps timed steps, each between two device syncs (wall time).
- `step_s`: mean time of a timed step, the slowest rank's (`step_s_per_rank`: every rank's);
- `peak_memory_gib`: `torch.cuda.max_memory_allocated` per rank over the timed steps (weights, gradients,
  AdamW state and activations; null on a CPU);
- `rank_tokens`, `rank_loss_tokens`: tokens each rank holds and how many of them carry the loss (noisy frames),
  counted from the frames the rank is given;
- `loss`: the last step's loss (the single-process value, as the trainer logs it).
Before a row runs, every rank checks that the model state (16 bytes per parameter: fp32 weights, gradients and
the two AdamW moments) fits in its GPU's free memory; if it does not on some rank, the row is reported as skipped
with its size. (The teacher-forcing mask is never built as a token mask: `FrameMaskAttention` attends by frame
groups.) Activations are not
in that estimate (the model keeps them all: no activation checkpointing), so a row can still run out of memory,
which stops the run; the JSON, rewritten after every row, keeps the finished ones. --layers and --height/--width
make such rows fit (step time and memory of the blocks scale with the layer count).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from longstream.bench.e2e import _write_json, parse_list
from longstream.bench.timing import sync
from longstream.bench.report import num, render_table
from longstream.config import get_preset
from longstream.errors import LongstreamError
from longstream.model.transformer import CausalWanTransformer
from longstream.parallel import ParallelContext, make_layout
from longstream.parallel.balanced_sp import LAYOUTS
from longstream.paths import output_file
from longstream.quant.training import TRAINING_MODES, convert_for_training
from longstream.train.distributed import ParallelTraining, check_layout

LR = 1e-5


def _ints(text: str, flag: str) -> list[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or not all(s.isdigit() and int(s) > 0 for s in items):
        raise LongstreamError(f"{flag} takes positive integers separated by commas, got {text!r}")
    return list(dict.fromkeys(int(s) for s in items))


def _gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _fits(nbytes: int, device: torch.device) -> bool:
    """True on every rank when `nbytes` fit in the free memory of every rank's GPU (always on a CPU)."""
    fits = device.type != "cuda" or nbytes < torch.cuda.mem_get_info(device)[0]
    flag = torch.tensor([float(fits)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Row:
    """Model, optimizer and inputs of one (frames, layout, GEMM mode) configuration on this rank."""

    def __init__(self, a: argparse.Namespace, ctx: ParallelContext, cfg, frames: int, layout: str, gemm: str) -> None:
        self.ctx, self.frames, self.batch = ctx, frames, a.batch
        dev = ctx.device
        torch.manual_seed(a.seed)
        self.model = CausalWanTransformer(cfg).to(dev).train()
        convert_for_training(self.model, gemm)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.parallel = ParallelTraining(ctx, "teacher_forcing", a.chunk_frames, a.shift, layout=layout)
        gen = torch.Generator().manual_seed(a.seed)
        self.x0 = torch.randn(a.batch, cfg.in_channels, frames, *a.latent_hw, generator=gen).to(dev)
        self.text = torch.randn(a.batch, a.text_tokens, cfg.text_dim, generator=gen).to(dev)
        self.autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                       enabled=dev.type == "cuda" and gemm == "bf16")

    def step(self, index: int) -> float:
        """One training step (see the module docstring); returns the reduced loss."""
        self.opt.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(index)
        with self.autocast:
            loss = self.parallel.loss(self.model, self.x0, self.text, self.batch, generator)
        value = self.parallel.reduce_loss(loss)
        loss.backward()
        self.parallel.reduce_gradients(self.model)
        self.opt.step()
        return value


def run_row(a: argparse.Namespace, ctx: ParallelContext, cfg, frames: int, layout: str, gemm: str) -> dict[str, Any]:
    dev = ctx.device
    lay = make_layout(layout, frames, a.chunk_frames, ctx.sp_size)
    mine = lay.local_frames(ctx.sp_rank)
    counts = {"rank_tokens": _gather(len(mine) * a.tokens_per_frame * a.batch),
              "rank_loss_tokens": _gather(int((mine >= frames).sum()) * a.tokens_per_frame * a.batch)}
    head = {"frames": frames, "layout": layout, "gemm": gemm, **counts}
    state_bytes = 16 * a.parameters
    if not _fits(state_bytes, dev):
        return {**head, "skipped": f"model state {state_bytes / 2**30:.1f} GiB exceeds free GPU memory"}
    row = Row(a, ctx, cfg, frames, layout, gemm)
    for i in range(a.warmup):
        row.step(i)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, loss = [], None
    for i in range(a.warmup, a.warmup + a.steps):
        sync(dev)
        start = time.perf_counter()
        loss = row.step(i)
        sync(dev)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    per_rank = _gather(sum(times) / len(times))
    return {**head, "skipped": None, "step_s": max(per_rank), "step_s_per_rank": per_rank,
            "peak_memory_gib": _gather(peak), "loss": loss}


COLUMNS = ("frames", "layout", "gemm", "step s", "peak GiB", "loss tokens per rank", "loss")


def format_table(result: dict[str, Any]) -> str:
    cells = [list(COLUMNS)]
    for r in result["rows"]:
        peaks = [m for m in r.get("peak_memory_gib") or [] if m is not None]
        loss_tokens = "/".join(str(n) for n in r["rank_loss_tokens"])
        if r["skipped"]:
            cells.append([str(r["frames"]), r["layout"], r["gemm"], "skipped", "-", loss_tokens, r["skipped"]])
            continue
        cells.append([str(r["frames"]), r["layout"], r["gemm"], f"{r['step_s']:.3f}",
                      num(max(peaks) if peaks else None, ".2f"), loss_tokens, f"{r['loss']:.4f}"])
    title = (f"{result['device']}  SP={result['sp']}  {result['preset']} ({result['layers']} layers)  "
             f"{result['width']}x{result['height']}  {result['tokens_per_frame']} tokens/frame  chunk "
             f"{result['chunk_frames']}  batch {result['batch']}  {result['steps']} timed steps after "
             f"{result['warmup']}")
    return "\n".join(render_table(title, cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.2-ti2v-5b")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--frames", default="128,256", help="comma list of clip lengths in latent frames")
    ap.add_argument("--layout", default="balanced,naive", help="comma list of balanced, naive")
    ap.add_argument("--gemm", default="bf16", help="comma list of bf16, fp8, nvfp4 (training GEMM modes)")
    ap.add_argument("--layers", type=int, default=None, help="run only the first N blocks (default: all)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--shift", type=float, default=5.0, help="timestep shift of the noise levels")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        if a.json:
            output_file(a.json, ".json", "--json")  # before any work: a bad path fails now, in one line
        frames_list = _ints(a.frames, "--frames")
        layouts = parse_list(a.layout, "--layout", list(LAYOUTS))
        gemms = parse_list(a.gemm, "--gemm", TRAINING_MODES)
        for flag, value in (("--batch", a.batch), ("--text-tokens", a.text_tokens), ("--steps", a.steps),
                            ("--layers", a.layers or 1)):
            if value < 1:
                raise LongstreamError(f"{flag} must be at least 1, got {value}")
        if a.warmup < 0:
            raise LongstreamError(f"--warmup must be at least 0, got {a.warmup}")
        preset = get_preset(a.preset)
        cfg = preset.transformer
        if a.layers is not None:
            if a.layers > cfg.num_layers:
                raise LongstreamError(f"--layers {a.layers} exceeds the preset's {cfg.num_layers}")
            cfg = dataclasses.replace(cfg, num_layers=a.layers)
        with torch.device("meta"):
            a.parameters = sum(p.numel() for p in CausalWanTransformer(cfg).parameters())
        a.latent_hw = preset.latent_size(a.height, a.width)
        a.tokens_per_frame = preset.tokens_per_frame(a.height, a.width)
        a.chunk_frames = preset.stream.chunk_frames
        if "WORLD_SIZE" not in os.environ:
            raise LongstreamError("launch with torchrun --nproc-per-node N (N = 1 for the SP = 1 figures)")
        world = int(os.environ["WORLD_SIZE"])
        for frames in frames_list:
            if frames % a.chunk_frames:
                raise LongstreamError(f"--frames {frames} is not a multiple of the preset's chunk of "
                                      f"{a.chunk_frames} latent frames")
            check_layout("teacher_forcing", world, world, a.batch, frames, a.chunk_frames, cfg)
            for layout in layouts:
                make_layout(layout, frames, a.chunk_frames, world)
        ctx = ParallelContext.from_env()
    except LongstreamError as exc:
        ap.error(str(exc))
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer: fp32 weights, TF32 matmuls
    result = {
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "sp": ctx.sp_size, "preset": preset.name,
        "layers": cfg.num_layers, "height": a.height or preset.height, "width": a.width or preset.width,
        "tokens_per_frame": a.tokens_per_frame, "chunk_frames": a.chunk_frames, "batch": a.batch,
        "parameters": a.parameters, "text_tokens": a.text_tokens, "warmup": a.warmup, "steps": a.steps,
        "seed": a.seed, "optimizer": "AdamW",
        "rows": [],
    }
    for frames in frames_list:
        for layout in layouts:
            for gemm in gemms:
                row = run_row(a, ctx, cfg, frames, layout, gemm)
                result["rows"].append(row)
                if ctx.rank == 0 and a.json:
                    _write_json(result, a.json)
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
    if ctx.rank == 0:
        print(format_table(result))
    ctx.close()


if __name__ == "__main__":
    main()
