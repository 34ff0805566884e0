"""A whole video end to end through `longstream generate`'s own path: DiT, VAE decode, MP4 written (issue 10).

Each row builds the preset's models once (random weights without --checkpoint, as `generate` does), makes a
short untimed warm-up video with them (Triton JIT, compiled elementwise steps, cuDNN plans), then times a
--seconds video from the first DiT pass to the MP4 closed on disk (`generate`'s `write_video`: chunks, decode on
the same GPU (async on its own stream, or in sequence), uint8 frames to the host, encoding). Rows are the cross
product of --steps and --linear. Reports per row: the video's wall time, its ratio to the video's length
(< 1: faster than real time), delivered video FPS, time until the first frames are encoded, peak GPU memory over
the timed video, and the number of frames the MP4 holds (read back with PyAV).

    python bench/video_e2e.py --preset wan2.2-ti2v-5b --seconds 64 --steps 4,2 --linear fp8 --json out.json
    python bench/video_e2e.py --preset tiny --seconds 2 --device cpu           # CPU smoke run

JSON: settings (device, torch, preset, seconds, warmup_seconds, kv_cache, attention, vae_dtype, async_decode) and
`rows`, each with steps, linear, video_s, realtime_ratio, video_fps, first_frame_s, warmup_s, load_s, peak_memory_gib
(null on a CPU), frames (expected) and mp4_frames (read back).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from longstream.bench.report import num, render_table
from longstream.devices import resolve_device
from longstream.paths import check_json_option
from longstream.pipeline.generate import GenerateRequest, Generation, prepare, write_video
from longstream.pipeline.video_io import read_video_info


def timed_video(gen: Generation) -> dict[str, float]:
    """Wall time of `write_video(gen)` and until its first frames are encoded (seconds)."""
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    start = time.perf_counter()
    first: list[float] = []
    write_video(gen, on_frames=lambda n: first or first.append(time.perf_counter() - start))
    return {"video_s": time.perf_counter() - start, "first_frame_s": first[0]}


def run_row(base: GenerateRequest, steps: int, linear: str, seconds: float, warmup_seconds: float,
            folder: Path) -> dict[str, float | int | str | None]:
    req = dataclasses.replace(base, steps=steps, linear=linear, seconds=warmup_seconds,
                              output=str(folder / f"warmup_{steps}_{linear}.mp4"))
    start = time.perf_counter()
    warm = prepare(req)
    load_s = time.perf_counter() - start
    warmup = timed_video(warm)
    models, device = warm.models, warm.device
    del warm  # its decoder's caches are not the timed video's memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = folder / f"video_{steps}_{linear}.mp4"
    gen = prepare(dataclasses.replace(req, seconds=seconds, output=str(out)), models=models)
    timing = timed_video(gen)
    frames = gen.plan.video_frames
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"steps": steps, "linear": linear, **timing, "realtime_ratio": timing["video_s"] / seconds,
            "video_fps": frames / timing["video_s"], "warmup_s": warmup["video_s"], "load_s": load_s,
            "peak_memory_gib": peak, "frames": frames, "mp4_frames": read_video_info(out)[0]}


def format_rows(title: str, rows: list[dict]) -> str:
    head = ["steps", "linear", "video s", "x real time", "FPS", "first frame s", "warm-up s", "load s", "peak GiB",
            "frames", "in MP4"]
    cells = [head] + [[str(r["steps"]), r["linear"], f"{r['video_s']:.1f}", f"{r['realtime_ratio']:.3f}",
                       f"{r['video_fps']:.2f}", f"{r['first_frame_s']:.2f}", f"{r['warmup_s']:.1f}",
                       f"{r['load_s']:.1f}", num(r["peak_memory_gib"], ".1f"), str(r["frames"]),
                       str(r["mp4_frames"])] for r in rows]
    return "\n".join(render_table(title, cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.2-ti2v-5b")
    p.add_argument("--prompt", default="a red circle moves left on a gray background")
    p.add_argument("--seconds", type=float, default=64.0, help="timed video length (default 64)")
    p.add_argument("--warmup-seconds", type=float, default=8.0,
                   help="untimed warm-up video, long enough to fill the KV window (default 8)")
    p.add_argument("--steps", default="4,2", help="comma list (default 4,2)")
    p.add_argument("--linear", default="fp8", help="comma list of bf16, fp8, nvfp4 (default fp8)")
    p.add_argument("--kv-cache", default="dense", choices=("dense", "fp8", "nvfp4"))
    p.add_argument("--attention", default="bf16", choices=("bf16", "fp8"), help="fp8 needs --kv-cache fp8")
    p.add_argument("--vae-dtype", choices=("bf16", "fp8", "fp32"), help="default: generate's (bf16 on CUDA)")
    p.add_argument("--async-decode", choices=("on", "off"), help="default: generate's (on for CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    a = p.parse_args()
    check_json_option(p, a.json, "--json")  # before any work
    device = resolve_device(a.device)
    async_decode = None if a.async_decode is None else a.async_decode == "on"
    base = GenerateRequest(output="", preset=a.preset, prompts=[a.prompt], device=str(device), progress=False,
                           kv_cache=a.kv_cache, attention=a.attention, vae_dtype=a.vae_dtype,
                           async_decode=async_decode)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": a.preset, "seconds": a.seconds,
              "warmup_seconds": a.warmup_seconds, "kv_cache": a.kv_cache, "attention": a.attention,
              "vae_dtype": a.vae_dtype,
              "async_decode": a.async_decode, "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        for steps, linear in itertools.product([int(s) for s in a.steps.split(",")], a.linear.split(",")):
            result["rows"].append(run_row(base, steps, linear, a.seconds, a.warmup_seconds, Path(folder)))
            print(format_rows(f"row {len(result['rows'])}", result["rows"][-1:]), flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps(result, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(format_rows(f"\n{result['device']}  {a.preset}  {a.seconds:g} s video  KV {a.kv_cache}  attention "
                      f"{a.attention}", result["rows"]))


if __name__ == "__main__":
    main()
