"""Streaming VAE decode speed per chunk: diffusers' layers vs the fast twins, layouts, cuDNN autotuning (GPU).

Default: the wan2.2-ti2v-5b preset's VAE with random weights, 704x1280, chunks of 8 latent frames (32 video
frames), bf16. Every variant decodes the same latents: one video-start chunk, one warm-up chunk, then --chunks
timed ones. Variants are the cross product of
  --layers: `plain` (diffusers' classes), `fast` (`accelerate`, eager), `fused` (`accelerate`, its norm + SiLU
    compiled: `longstream.fused`), `fused-cl` (the same with `accelerate(channels_last=True)`), `fused-cl-3x3`
    (fused-cl with the upsamplers' 3x3 conv on the upsampled image, not `SubPixelUpConv`), `fused-cl-nofold`
    (fused-cl with cuDNN adding the residual blocks' conv biases, not `FastResidualBlock`'s folded ones),
    `fused-cl-fp8` (fused-cl with the residual blocks' 3x3x3 convolutions in FP8: `accelerate(fp8=True)`, Hopper);
  --frames-per-call: latent frames per decoder call (`StreamingDecoder`);
  --cudnn-benchmark: off / on (cuDNN picks the fastest algorithm per shape on first use).
Reports seconds per chunk, video FPS, TFLOP/s (convolution FLOPs of diffusers' layers, counted once with torch's
FlopCounterMode: sub-pixel rows do fewer),
the output's max difference from the first variant, and for the last variant the top GPU kernels and the PyTorch
ops (by input shape) whose own GPU time is largest. Each variant
builds the VAE afresh from the same seed.

    python bench/vae_decode.py [--layers plain,fast,fused,fused-cl,fused-cl-3x3,fused-cl-nofold,fused-cl-fp8]
        [--frames-per-call 4] [--cudnn-benchmark off,on]
        [--chunks 3] [--base-dim N] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from longstream.config import get_preset
from longstream.vae import StreamingDecoder, build_vae
from longstream.fused import fusion
from longstream.paths import check_json_option
from longstream.vae.fast import FastResidualBlock, accelerate

LAYERS = ("plain", "fast", "fused", "fused-cl", "fused-cl-3x3", "fused-cl-nofold", "fused-cl-fp8")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(kind: str, layers: str, dtype: torch.dtype, device: torch.device, base_dim: int = 0):
    """The VAE of `kind` (seed 0; `base_dim` channels if given) in the `layers` variant."""
    width = {"base_dim": base_dim} if base_dim else {}
    vae = build_vae(kind, dtype=dtype, device=device, seed=0, **width)
    if layers == "plain" or device == "meta":
        return vae
    accelerate(vae, channels_last=layers.startswith("fused-cl"), sub_pixel=layers != "fused-cl-3x3",
               fp8=layers == "fused-cl-fp8")
    for block in vae.modules():
        if layers == "fused-cl-nofold" and isinstance(block, FastResidualBlock):
            block.fold_bias = False
    return vae


def decode_chunks(decoder: StreamingDecoder, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [decoder.decode(c) for c in chunks]


def profile_top(fn: Callable[[], object], count: int) -> tuple[list[dict], list[dict]]:
    """One call of `fn` under the profiler: the `count` GPU kernels with the most total time, and the `count`
    PyTorch ops (with their input shapes) with the most GPU time of their own (which names a kernel's caller)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels)
    kernels.sort(key=lambda e: -e.device_time_total)
    top_kernels = [dict(name=e.key[:90], ms=e.device_time_total / 1e3, share=e.device_time_total / total,
                        calls=e.count) for e in kernels[:count]]
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type.name == "CPU" and e.self_device_time_total > 0]
    ops.sort(key=lambda e: -e.self_device_time_total)
    top_ops = [dict(name=e.key, ms=e.self_device_time_total / 1e3, share=e.self_device_time_total / total,
                    calls=e.count, input_shapes=str(e.input_shapes)[:160]) for e in ops[:count]]
    return top_kernels, top_ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.2-ti2v-5b")
    p.add_argument("--layers", default="plain,fast,fused,fused-cl")
    p.add_argument("--frames-per-call", default="4")
    p.add_argument("--cudnn-benchmark", default="off,on")
    p.add_argument("--chunks", type=int, default=3, help="timed chunks per variant")
    p.add_argument("--base-dim", type=int, default=0, help="the VAE's base channels (default: the preset's)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    check_json_option(p, a.json, "--json")  # before any work
    layers = a.layers.split(",")
    if any(x not in LAYERS for x in layers):
        p.error(f"--layers takes {', '.join(LAYERS)}")
    per_call = [int(x) for x in a.frames_per_call.split(",")]
    autotune = [{"off": False, "on": True}[x] for x in a.cudnn_benchmark.split(",")]

    preset = get_preset(a.preset)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    frames = preset.stream.chunk_frames
    gen = torch.Generator(device=dev).manual_seed(0)
    lat = [torch.randn(1, preset.vae.z_dim, 1 if i == 0 else frames, *preset.latent_size(), device=dev,
                       dtype=dtype, generator=gen) for i in range(2 + a.chunks)]

    def measure(lay: str, fpc: int) -> tuple[float, torch.Tensor, StreamingDecoder]:
        """Seconds per timed chunk, the last chunk's frames, and the decoder (its video continues)."""
        vae = build(preset.vae.kind, lay, dtype, dev, a.base_dim)
        decoder = StreamingDecoder(vae, normalized=True, frames_per_call=fpc)
        decode_chunks(decoder, lat[:2])  # video start + warm-up (and cuDNN autotuning)
        sync()
        start = time.perf_counter()
        out = decode_chunks(decoder, lat[2:])
        sync()
        return (time.perf_counter() - start) / a.chunks, out[-1].float(), decoder

    with torch.no_grad():  # FLOPs of a steady chunk, counted on the meta device
        counting = StreamingDecoder(build(preset.vae.kind, "plain", dtype, "meta", a.base_dim), normalized=True)
        decode_chunks(counting, [z.to("meta") for z in lat[:2]])
        counter = FlopCounterMode(display=False)
        with counter:
            counting.decode(lat[2].to("meta"))
    flops = counter.get_total_flops()
    video_frames = frames * preset.vae.temporal
    rows, reference, kernels, ops = [], None, [], []
    for lay, fpc, bench in itertools.product(layers, per_call, autotune):
        torch.backends.cudnn.benchmark = bench
        with torch.no_grad(), fusion(lay.startswith("fused")):
            seconds, last, decoder = measure(lay, fpc)
            if dev.type == "cuda" and (lay, fpc, bench) == (layers[-1], per_call[-1], autotune[-1]):
                kernels, ops = profile_top(functools.partial(decoder.decode, lat[-1]), 15)
        reference = last if reference is None else reference
        rows.append(dict(layers=lay, frames_per_call=fpc, cudnn_benchmark=bench, chunk_s=seconds,
                         video_fps=video_frames / seconds, tflops=flops / seconds / 1e12,
                         max_diff=(last - reference).abs().max().item()))
        print(f"{lay:8s} fpc {fpc}  cudnn.benchmark {'on ' if bench else 'off'}  {seconds:.3f} s/chunk  "
              f"{video_frames / seconds:6.1f} FPS  {flops / seconds / 1e12:6.1f} TFLOP/s  "
              f"max diff {rows[-1]['max_diff']:.3g}", flush=True)
        del decoder
    for k in kernels:
        print(f"  {k['share']:6.1%} {k['ms']:8.1f} ms {k['calls']:5d}x  {k['name']}")
    for o in ops:
        print(f"  {o['share']:6.1%} {o['ms']:8.1f} ms {o['calls']:5d}x  {o['name']} {o['input_shapes']}")
    result = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                  date=time.strftime("%Y-%m-%d"), torch=torch.__version__, preset=a.preset,
                  size=[preset.width, preset.height], base_dim=a.base_dim or None, chunk_latent_frames=frames,
                  dtype=str(dtype),
                  tflop_per_chunk=flops / 1e12, tflop_per_video_frame=flops / 1e12 / (frames * preset.vae.temporal),
                  rows=rows, top_kernels_last_row=kernels, top_ops_last_row=ops,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
    print(f"{flops / 1e12:.1f} TFLOP a chunk ({result['tflop_per_video_frame']:.2f} per video frame)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
