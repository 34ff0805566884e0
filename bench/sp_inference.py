"""Sequence-parallel streaming inference: DiT FPS and the Ulysses traffic per chunk, one row per (steps, K/V exchange).

    torchrun --nproc-per-node N bench/sp_inference.py --preset wan2.2-ti2v-5b --steps 4,2 \
        --kv-exchange bf16,fp8,nvfp4 --chunks 12 --json spN.json [--compare-to sp1.json]
    python bench/sp_inference.py --preset wan2.2-ti2v-5b --steps 4,2 --json sp1.json        # SP = 1

What runs: the generation path of `longstream generate --sp N` (`StreamingGenerator` with a `StreamShard` over the
torchrun group: each rank runs the transformer on its share of a chunk's latent frames, self-attention through
Ulysses all-to-alls, the velocity all-gathered after each pass), on the model of `longstream bench e2e` (random
seeded weights in --linear format, one prompt of --text-tokens random tokens, one noise seed; no VAE). Compute in
bf16 on GPUs (float32 on a CPU). At SP = 1 there is no shard (the single-GPU path) and one row per step count.
The KV cache keeps --kv-cache storage; --kv-exchange is the format of K and V on the wire (`UlyssesAttention`
kv_format: bf16 = uncompressed in the compute dtype, float32 on a CPU; Q and the attention output always travel
in the compute dtype).

Per row, a warm-up stream up to the first chunk at a full KV window, then a timed stream of --chunks chunks;
measured are the chunks from the first full-window one on (as in `bench e2e`):
- `dit_fps`: video frames per chunk (latent frames x VAE temporal factor) / mean DiT time per measured chunk,
  the slowest rank's (CUDA events on the generating stream; wall time on a CPU);
- `a2a_ms`: time per chunk inside the Ulysses exchanges (`ulysses.exchange`: packing, `all_to_all_single`,
  unpacking), the q/k/v and the output exchange of every layer and pass; `kv_codec_ms`: time in the K/V
  quantize/dequantize around them (fp8/nvfp4 exchange only); `gather_ms`: time in the velocity all-gathers. Each
  is the sum of CUDA-event intervals around the calls (wall time on a CPU), so a rank waiting for a slower peer
  counts that wait; the figure is the mean over measured chunks on the rank with the largest value;
- `bytes_per_chunk`: bytes one rank sends to the other ranks per chunk, by tensor (q, k, v, out; k and v with
  their scales), counted from the tensors handed to the all-to-all (`ExchangeStats`), the largest over ranks;
  `kv_bytes_per_chunk` = k + v; `gather_bytes_per_chunk`: what the rank sends in the all-gathers;
- `peak_memory_gib`: `torch.cuda.max_memory_allocated` per rank over the timed stream, weights included (null on
  a CPU).
With --compare-to an SP = 1 JSON of the same preset, size, linear and cache format: `speedup` = dit_fps / its
dit_fps at the same step count, `efficiency` = speedup / N.

Rank 0 prints the table and writes --json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longstream.bench.e2e import (
    E2ERequest,
    RowConfig,
    _Bench,
    _Clock,
    _write_json,
    parse_list,
    plan,
)
from longstream.bench.timing import sync
from longstream.bench.report import num, render_table
from longstream.devices import resolve_device
from longstream.errors import LongstreamError
from longstream.parallel import (
    ExchangeStats,
    ParallelContext,
    even_splits,
    stream_sp,
    ulysses,
)
from longstream.parallel.stream_sp import StreamShard
from longstream.pipeline.stream import StreamingGenerator
from longstream.quant.linear import MODES

KV_EXCHANGES = {"bf16": "dense", "fp8": "fp8", "nvfp4": "nvfp4"}
KV_CACHES = ("dense", "fp8", "nvfp4")
A2A, CODEC, GATHER = "a2a", "kv_codec", "gather"


class CountingShard(StreamShard):
    """A `StreamShard` whose exchanges all count their bytes into one `ExchangeStats`."""

    def __init__(self, group: dist.ProcessGroup | None, kv_format: str) -> None:
        super().__init__(group, kv_format)
        self.stats = ExchangeStats()

    def attention(self, *args, **kwargs) -> ulysses.UlyssesAttention:
        exchange = super().attention(*args, **kwargs)
        exchange.stats = self.stats
        return exchange


class CommTimer:
    """Clock marks around the exchange, K/V codec and gather functions while `active` (see `patched`)."""

    def __init__(self, device: torch.device, world: int) -> None:
        self.clock = _Clock(device)
        self.world = world
        self.marks: dict[str, list[tuple[Any, Any]]] = {A2A: [], CODEC: [], GATHER: []}
        self.gather_bytes = 0

    def _timed(self, kind: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            start = self.clock.mark()
            out = fn(*args, **kwargs)
            self.marks[kind].append((start, self.clock.mark()))
            return out

        return call

    def _gather(self, fn: Callable) -> Callable:
        timed = self._timed(GATHER, fn)

        def call(x: torch.Tensor, group, splits, dim: int) -> torch.Tensor:
            padded = x.numel() // max(x.shape[dim], 1) * max(splits) * x.element_size()
            self.gather_bytes += padded * (self.world - 1)
            return timed(x, group, splits, dim)

        return call

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Route `ulysses.exchange`, `ulysses.quantize_kv` / `dequantize_kv` and `stream_sp.gather_seq` (the names
        `UlyssesAttention` and `StreamShard` call) through the timer; restored on exit."""
        saved = [(ulysses, "exchange"), (ulysses, "quantize_kv"), (ulysses, "dequantize_kv"),
                 (stream_sp, "gather_seq")]
        originals = [getattr(m, n) for m, n in saved]
        ulysses.exchange = self._timed(A2A, originals[0])
        ulysses.quantize_kv = self._timed(CODEC, originals[1])
        ulysses.dequantize_kv = self._timed(CODEC, originals[2])
        stream_sp.gather_seq = self._gather(originals[3])
        try:
            yield
        finally:
            for (module, name), fn in zip(saved, originals):
                setattr(module, name, fn)

    def take(self) -> dict[str, list[tuple[Any, Any]]]:
        """The marks since the last call (one chunk's), cleared."""
        out = {k: list(v) for k, v in self.marks.items()}
        for v in self.marks.values():
            v.clear()
        return out


def _max_over_ranks(value: float, ctx: ParallelContext) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.sp_group)
    return t.item()


def _per_rank(value: Any, ctx: ParallelContext) -> list[Any]:
    if not ctx.distributed:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def run_row(bench: _Bench, model, ctx: ParallelContext, steps: int, kv_exchange: str | None) -> dict[str, Any]:
    """Warm up, then time one stream (see the module docstring); every rank returns the same row."""
    p, dev = bench.p, bench.p.device
    row = RowConfig(steps, p.request.linear, p.request.kv_cache, None)

    def generator() -> StreamingGenerator:
        shard = CountingShard(ctx.sp_group, KV_EXCHANGES[kv_exchange]) if kv_exchange else None
        return StreamingGenerator(model, p.stream(steps), p.latent_hw, kv_storage=row.kv_cache, shard=shard)

    for _ in bench._chunks(model, row, p.first_full + 1, generator()):
        pass
    gen = generator()
    timer = CommTimer(dev, ctx.sp_size)
    clock = timer.clock
    count = p.request.chunks
    measured = range(p.first_measured, count)
    dit, comm, sent, gathered = [], [], [], []
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with timer.patched():
        chunks = bench._chunks(model, row, count, gen)
        for _ in range(count):
            bytes_before = dict(gen.shard.stats.bytes_sent) if gen.shard else {}
            gather_before = timer.gather_bytes
            begin = clock.mark()
            next(chunks)
            dit.append((begin, clock.mark()))
            comm.append(timer.take())
            after = gen.shard.stats.bytes_sent if gen.shard else {}
            sent.append({k: after[k] - bytes_before.get(k, 0) for k in after})
            gathered.append(timer.gather_bytes - gather_before)
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None

    def mean(values: list[float]) -> float:
        return sum(values[i] for i in measured) / len(measured)

    dit_s = _max_over_ranks(mean([clock.seconds(b, e) for b, e in dit]), ctx)
    times = {kind: _max_over_ranks(mean([sum(clock.seconds(b, e) for b, e in c[kind]) for c in comm]), ctx) * 1000
             for kind in (A2A, CODEC, GATHER)}
    by_tensor = {k: _max_over_ranks(mean([s.get(k, 0) for s in sent]), ctx) for k in ("q", "k", "v", "out")}
    frames = p.preset.stream.chunk_frames * p.preset.vae.temporal
    return {
        "steps": steps, "kv_exchange": kv_exchange, "dit_fps": frames / dit_s, "dit_chunk_s": dit_s,
        "a2a_ms": times[A2A], "kv_codec_ms": times[CODEC], "gather_ms": times[GATHER],
        "bytes_per_chunk": by_tensor, "a2a_bytes_per_chunk": sum(by_tensor.values()),
        "kv_bytes_per_chunk": by_tensor["k"] + by_tensor["v"],
        "gather_bytes_per_chunk": _max_over_ranks(mean(gathered), ctx),
        "peak_memory_gib": _per_rank(peak, ctx),
    }


def compare(rows: list[dict[str, Any]], base: dict[str, Any], sp: int) -> None:
    """Add speedup and efficiency against the SP = 1 result `base`, matched by step count."""
    fps = {r["steps"]: r["dit_fps"] for r in base["rows"]}
    for row in rows:
        speedup = row["dit_fps"] / fps[row["steps"]] if row["steps"] in fps else None
        row["speedup"] = speedup
        row["efficiency"] = None if speedup is None else speedup / sp


def load_baseline(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """An SP = 1 JSON of this script that matches `settings`; one-line errors otherwise."""
    try:
        base = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LongstreamError(f"--compare-to {path}: cannot read it as JSON ({exc})") from None
    if base.get("sp") != 1 or "rows" not in base:
        raise LongstreamError(f"--compare-to {path} is not an SP = 1 result of bench/sp_inference.py")
    for key in ("preset", "height", "width", "linear", "kv_cache", "dtype"):
        if base.get(key) != settings[key]:
            raise LongstreamError(f"--compare-to {path} has {key} {base.get(key)!r}, this run {settings[key]!r}")
    return base


COLUMNS = ("steps", "K/V", "DiT FPS", "speedup", "eff", "a2a ms", "codec ms", "gather ms", "a2a MB", "k+v MB",
           "peak GiB")


def format_table(result: dict[str, Any]) -> str:
    """The rows as text; MB and ms per chunk, peak memory as the largest over ranks."""
    cells = [list(COLUMNS)]
    for r in result["rows"]:
        peaks = [m for m in r["peak_memory_gib"] if m is not None]
        cells.append([str(r["steps"]), r["kv_exchange"] or "-", f"{r['dit_fps']:.2f}", num(r.get("speedup"), ".2f"),
                      num(r.get("efficiency"), ".2f"), f"{r['a2a_ms']:.1f}", f"{r['kv_codec_ms']:.1f}",
                      f"{r['gather_ms']:.1f}", f"{r['a2a_bytes_per_chunk'] / 1e6:.2f}",
                      f"{r['kv_bytes_per_chunk'] / 1e6:.2f}", num(max(peaks) if peaks else None, ".2f")])
    title = (f"{result['device']}  SP={result['sp']}  {result['preset']}  {result['width']}x{result['height']}  "
             f"{result['tokens_per_frame']} tokens/frame  chunk {result['chunk_frames']} / window "
             f"{result['window_frames']}  {result['linear']} linears, {result['kv_cache']} cache, {result['dtype']}; "
             f"measured chunks {result['first_measured_chunk'] + 1}..{result['chunks']}")
    return "\n".join(render_table(title, cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.2-ti2v-5b")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", default=None, help="comma list (default: the preset's)")
    ap.add_argument("--kv-exchange", default="bf16", help="comma list of bf16, fp8, nvfp4 (K/V on the wire)")
    ap.add_argument("--kv-cache", default="dense", choices=KV_CACHES)
    ap.add_argument("--linear", default="bf16", choices=MODES)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="SP = 1 without torchrun only (torchrun: cuda:LOCAL_RANK)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare-to", default=None, help="an SP = 1 JSON of this script: adds speedup, efficiency")
    a = ap.parse_args(argv)
    try:
        exchanges = parse_list(a.kv_exchange, "--kv-exchange", list(KV_EXCHANGES))
        ctx = ParallelContext.from_env(device=None if "WORLD_SIZE" in os.environ else resolve_device(a.device))
        p = plan(E2ERequest(preset=a.preset, height=a.height, width=a.width, chunks=a.chunks, steps=a.steps,
                            linear=a.linear, kv_cache=a.kv_cache, vae=False, text_tokens=a.text_tokens,
                            seed=a.seed, json=a.json, device=str(ctx.device), progress=False))
        cfg, stream = p.preset.transformer, p.preset.stream
        if ctx.sp_size > 1:
            if "nvfp4" in exchanges and cfg.attention_head_dim % 16:
                raise LongstreamError(f"--kv-exchange nvfp4 needs a head dimension divisible by 16; preset "
                                      f"{p.preset.name} has {cfg.attention_head_dim}")
            if stream.chunk_frames < ctx.sp_size:
                raise LongstreamError(f"a chunk of {stream.chunk_frames} latent frames cannot be shared by "
                                      f"{ctx.sp_size} ranks")
            if ctx.sp_size > cfg.num_attention_heads:
                raise LongstreamError(f"SP {ctx.sp_size} exceeds the model's {cfg.num_attention_heads} heads")
        settings = {
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "sp": ctx.sp_size,
            "preset": p.preset.name, "height": p.height, "width": p.width, "tokens_per_frame": p.tokens_per_frame,
            "chunk_frames": stream.chunk_frames, "window_frames": stream.window_frames,
            "sink_frames": stream.sink_frames, "frame_splits": even_splits(stream.chunk_frames, ctx.sp_size),
            "chunks": a.chunks, "first_measured_chunk": p.first_measured, "linear": a.linear,
            "kv_cache": a.kv_cache, "text_tokens": a.text_tokens, "seed": a.seed,
            "dtype": str(p.dtype).removeprefix("torch."),
        }
        base = load_baseline(a.compare_to, settings) if a.compare_to else None
    except LongstreamError as exc:
        ap.error(str(exc))
    bench = _Bench(p)
    model = bench.transformer(a.linear)
    rows_to_run = [(s, x) for s in sorted({r.steps for r in p.rows}, reverse=True)
                   for x in (exchanges if ctx.sp_size > 1 else [None])]
    result = {**settings, "rows": []}
    for i, (steps, exchange) in enumerate(rows_to_run):
        row = run_row(bench, model, ctx, steps, exchange)
        result["rows"].append(row)
        if base is not None:
            compare(result["rows"], base, ctx.sp_size)
        if ctx.rank == 0:
            print(f"[{i + 1}/{len(rows_to_run)}] {steps} steps, K/V {exchange or '-'}: DiT {row['dit_fps']:.2f} FPS",
                  file=sys.stderr)
            if a.json:
                _write_json(result, a.json)
    if ctx.rank == 0:
        print(format_table(result))
    ctx.close()


if __name__ == "__main__":
    main()
