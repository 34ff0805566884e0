"""Time per chunk of the DiT, the VAE, both in sequence, and both overlapped by `AsyncDecoder` (GPU).

Default: the wan2.2-ti2v-5b preset with random weights, 704x1280, 8 latent frames a chunk, a window of 32 latent
frames with 8 sink frames, 4 sampling steps, bf16. Chunks before the window is full are warm-up.

    python bench/async_decode.py [--chunks 3] [--steps 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from longstream.config import get_preset
from longstream.model.transformer import CausalWanTransformer
from longstream.paths import check_json_option
from longstream.pipeline.stream import ShotPlan, StreamingGenerator
from longstream.vae import StreamingDecoder, build_vae
from longstream.vae.async_decode import AsyncDecoder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.2-ti2v-5b")
    p.add_argument("--chunks", type=int, default=3, help="measured chunks (after the window is full)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="bench/results/async_decode.json")
    a = p.parse_args()
    check_json_option(p, a.out, "--out")  # before any work
    preset = get_preset(a.preset)
    stream = dataclasses.replace(preset.stream, steps=a.steps)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):
        model = CausalWanTransformer(preset.transformer).to(dtype).eval()
        vae = build_vae(preset.vae.kind).to(dtype).eval()
    latent_hw = preset.latent_size()
    warm = stream.window_frames // stream.chunk_frames
    text = torch.randn(1, 512, preset.transformer.text_dim, device=dev)

    def to_host(frames: torch.Tensor) -> torch.Tensor:
        """What the MP4 writer receives: uint8 frames on the host."""
        return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    def seconds_per_chunk(decode: bool, overlap: bool) -> float:
        """Mean wall time per measured chunk (after `warm` chunks fill the window)."""
        gen = StreamingGenerator(model, stream, latent_hw)
        decoder = StreamingDecoder(vae, normalized=True)
        chunks = gen.generate([ShotPlan(text, warm + a.chunks)], generator=torch.Generator().manual_seed(0))
        for _ in range(warm):
            latents = next(chunks).latents
            if decode:
                to_host(decoder.decode(latents))
        sync()
        start = time.perf_counter()
        if overlap:
            with AsyncDecoder(decoder.decode, to_host, device=dev if dev.type == "cuda" else None) as worker:
                for _ in range(a.chunks):
                    worker.submit(next(chunks).latents)
        else:
            for _ in range(a.chunks):
                latents = next(chunks).latents
                if decode:
                    to_host(decoder.decode(latents))
        sync()
        return (time.perf_counter() - start) / a.chunks

    with torch.no_grad():
        dit = seconds_per_chunk(decode=False, overlap=False)
        sequential = seconds_per_chunk(decode=True, overlap=False)
        overlapped = seconds_per_chunk(decode=True, overlap=True)
        decoder = StreamingDecoder(vae, normalized=True)
        latents = torch.randn(1, preset.transformer.in_channels, stream.chunk_frames, *latent_hw, device=dev,
                              dtype=dtype)
        decoder.decode(latents)  # a video's first chunk is special; time later ones
        vae_only = sum(timed(lambda: to_host(decoder.decode(latents))) for _ in range(a.chunks)) / a.chunks
    frames = stream.chunk_frames * preset.vae.temporal
    on_gpu = dev.type == "cuda"
    result = dict(
        device=torch.cuda.get_device_name() if on_gpu else "cpu", date=time.strftime("%Y-%m-%d"), preset=a.preset,
        steps=a.steps,
        chunk_latent_frames=stream.chunk_frames, video_frames_per_chunk=frames,
        seconds_per_chunk=dict(dit=dit, vae=vae_only, sequential=sequential, async_=overlapped),
        async_over_max=overlapped / max(dit, vae_only),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
    )
    print(f"{result['device']}  {a.preset}  {preset.width}x{preset.height}  {a.steps} steps  {dtype}, eager")
    print(f"{'mode':12s} {'s/chunk':>8s} {'video FPS':>10s}")
    for name, t in (("DiT alone", dit), ("VAE alone", vae_only), ("sequential", sequential), ("async", overlapped)):
        print(f"{name:12s} {t:8.3f} {frames / t:10.1f}")
    print(f"async / max(DiT, VAE) = {result['async_over_max']:.3f}; peak memory {result['peak_memory_gb']:.1f} GiB")
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
