"""`longstream bench e2e`: end-to-end streaming throughput of the DiT and the VAE, one row per configuration.

    longstream bench e2e                                    # wan2.2-ti2v-5b, 704x1280, 12 chunks, one row
    longstream bench e2e --steps 4,2 --linear bf16,fp8,nvfp4 --kv-cache dense,fp8,nvfp4 --async-decode on,off \
        --json e2e.json                                     # the full sweep: 36 rows
    longstream bench e2e --preset tiny --chunks 5 --device cpu    # CPU smoke run

Comma lists make a sweep; every combination is one row, and a row streams first_measured_chunk + 2 chunks (the
profiled pass) and then --chunks chunks (the timed pass): split long sweeps into several commands, the JSON
holds every finished row. Weights are random and seeded (the same weights in every row, quantized in fp8 and
nvfp4 rows), with the preset's resolution (or --height/--width), chunk, window and sink; one prompt of
--text-tokens random embedding tokens (512, umT5's padded length) and one noise seed, so every row denoises the
same noise. `--fusion on,off` runs the elementwise steps of the transformer block and of the VAE's norms compiled
(one kernel each, `longstream.fused`) or eagerly; it only exists on CUDA (CPU rows are eager). `--fuse-qkv on,off`
computes self-attention's q, k, v with one projection (`longstream.model.fuse_qkv`: one GEMM, one activation
quantize) or three (nvfp4 linears stay unfused). Compute in bf16 on a GPU (float32 on a CPU). The VAE has random
weights and decodes with `StreamingDecoder`, 4 latent frames a call as in `longstream generate`, in the compute
dtype, channels-last (as generate decodes on a GPU and a CPU), on --decode-device if given (a second GPU, as the paper
decodes; the DiT's device otherwise).

Per row, on a model built (and quantized, q/k/v-fused, compiled) once per linear format and q/k/v setting:

1. Profiled pass, which is also the warm-up (Triton JIT, cuDNN plans, torch.compile): chunks up to one past the
   first chunk at a full KV window, decoded in sequence; the last chunk runs under torch.profiler between two
   device syncs. Breakdown of that chunk (ms):
   - `linears`: every Linear / QuantLinear call of the denoising passes (activation quantization included);
   - `attention`: every `KVCache.attend` call of the denoising passes (K/V write with its quantization, the cache
     read with its dequantization, SDPA) and the cross-attention SDPA;
   - `cache_write`: the whole pass at t = 0 that writes the chunk's K/V;
   - `vae`: streaming decode and the copy of uint8 frames to the host;
   - `other`: the chunk's wall time minus the above (norms, RoPE, modulation, sampler arithmetic, launch gaps and
     host overhead).
   Components are labelled with `torch.profiler.record_function` (wrappers put on the Linear modules, the caches'
   `attend`, the cache-writing pass and the decode for this pass only); aten linear ops (linear, addmm, mm, bmm,
   matmul, _scaled_mm) and SDPA ops outside any label count as linears and attention. On a GPU a component's time
   is the summed duration of the kernels launched inside it, so GPU idle time lands in `other`; on a CPU it is the
   component's wall time. torch.profiler gives a correlation id's kernels to every CPU event with that id
   (`shared_ids` counts such events), so each id's kernels count once. Two more GPU figures check the
   attribution: `kernels` (all kernel time of the chunk) and `unlinked` (kernel time the profiler tied to no CPU
   event, which therefore counts in `other`); a negative `unlinked` would mean kernels counted twice, and the
   table then flags the row's breakdown as inconsistent. With --compile the
   Linear and attend wrappers are left off (they would run inside the compiled code): linears and attention are
   then the aten GEMM and SDPA ops that the compiled code calls, while GEMMs that inductor generates as Triton
   templates, and fused kernels, count as `other`.
2. Timed pass: a fresh stream of --chunks chunks decoded as the row says (sequentially, or on `AsyncDecoder`'s
   worker, on its own CUDA stream), with no host sync added by the benchmark: CUDA events around each chunk's
   DiT work on the generating stream, and a host timestamp when a chunk's frames reach the host as uint8 (what
   the MP4 writer receives, converted on the device; MP4 encoding is not timed). Measured: the chunks from the
   first at a full window on.
   - `video_fps`: their decoded frames / host time from the delivery of the chunk before them to the last delivery;
   - `dit_fps`: the same chunks' video frames (chunk_frames * VAE temporal factor each) / their summed DiT time,
     as the paper counts generation FPS;
   - `first_frame_s`: host time from the start of the stream (prompt projection included) to the first frames on
     the host; `first_chunk_s`: DiT time of the first chunk;
   - `peak_memory_gib`: `torch.cuda.max_memory_allocated` over the timed pass, weights included (null on a CPU);
   - `latent_rel_error`: ||z - z_ref|| / ||z_ref|| over every chunk's latents, z_ref from eager bf16 linears with a
     dense KV cache, no fusion and three q/k/v projections, the same steps, weights, prompt and noise (0 for that
     row itself; streamed untimed first when no row is that one).
   With --no-vae the VAE is not built: video_fps, first_frame_s and the vae breakdown are null.
3. Roofline (`longstream.bench.roofline`): FLOPs and bytes per video frame from the config, and the DiT's FPS
   ceiling for --peak-tflops / --peak-tbps.

--compile [MODE] wraps `CausalWanTransformer.forward_stream` (one transformer pass over a chunk, run steps + 1 times
per chunk) in torch.compile. The default mode, max-autotune-no-cudagraphs, fuses the elementwise work around the
GEMMs and autotunes the GEMMs; `default` compiles faster without autotuning. CUDA graphs (reduce-overhead) are not
offered: every pass writes the KV cache in place and the visible cache length grows until the window is full, and
cudagraph trees reuse output buffers that the generator hands on as a chunk's latents. Each model (one per linear
format and q/k/v setting) is compiled afresh, during the profiled passes; it gets a graph per pass kind (denoising
or cache-writing), cache length (the first chunk's, a dynamic one for the growing cache, the full window's) and KV
format: about 6 per KV format. A graph break inside a block (the CPU fp8 reference linears check for NaN on the
host) multiplies that by the layers, as the resumed code is guarded on the layer index. The recompile limit is
raised to 256 graphs per function and reaching it is an error, so that no row silently falls back to eager.

JSON: the settings (device, torch, preset, height, width, tokens_per_frame, chunk_frames, window_frames,
sink_frames, chunks, first_measured_chunk, text_tokens, seed, dtype, vae, vae_dtype, decode_device, compile,
peak_tflops, peak_tbps) and `rows`, each with steps, linear, kv_cache, attention, async_decode (null without VAE),
fusion, fuse_qkv, video_fps, dit_fps, chunk_s (steady host time per chunk), dit_chunk_s, first_frame_s, first_chunk_s,
peak_memory_gib, latent_rel_error, breakdown_ms {linears, attention, cache_write, vae, other, chunk, kernels,
unlinked, shared_ids, top_kernels (GPU: the TOP_KERNELS kernels with the most time in the profiled chunk)} and
roofline {flops_per_frame, linear_flops_per_frame, attention_flops_per_frame, bytes_per_frame, compute_bound_fps,
memory_bound_fps, ceiling_fps, bound, dit_fraction}. The file is rewritten after every row, so a stopped sweep keeps
its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..config import Preset, StreamConfig, get_preset
from ..devices import has_tma, resolve_device
from ..errors import UsageError
from ..fused import fusion, serialized
from ..model.fuse_qkv import fuse_qkv
from ..model.kv_cache import ATTENTION_KINDS
from ..model.transformer import CausalWanTransformer
from ..paths import output_file, write_text_atomic
from ..pipeline.stream import ShotPlan, StreamingGenerator
from ..quant.linear import MODES, quantize_model
from ..vae import StreamingDecoder, build_vae
from ..vae.async_decode import AsyncDecoder
from ..vae.fast import accelerate, channels_last_pays
from .breakdown import LABEL, VAE, breakdown, label_attention, labels, top_kernels
from .roofline import PEAK_TBPS, PEAK_TFLOPS, ChunkCost, ceiling, chunk_cost
from .timing import release, sync

KV_CACHES = ("dense", "fp8", "nvfp4")
ON_OFF = {"on": True, "off": False}
COMPILE_MODES = ("max-autotune-no-cudagraphs", "default")
RECOMPILE_LIMIT = 256  # graphs per compiled function (see the module docstring)
TOP_KERNELS = 25  # kernels listed per profiled chunk in the JSON



@dataclass
class E2ERequest:
    """What `longstream bench e2e` was asked; lists are comma-separated strings as on the command line."""

    preset: str = "wan2.2-ti2v-5b"
    height: int | None = None
    width: int | None = None
    chunks: int = 12
    steps: str | None = None  # None: the preset's
    linear: str = "bf16"
    kv_cache: str = "dense"
    attention: str = "bf16"
    async_decode: str = "on"
    fusion: str = "on"
    fuse_qkv: str = "on"
    vae: bool = True
    vae_dtype: str = "bf16"  # "fp8": the decoder's residual-block convolutions in FP8 (longstream.vae.fp8; Hopper)
    compile: str | None = None
    text_tokens: int = 512
    seed: int = 0
    peak_tflops: str | None = None  # "bf16=780,fp8=1300": overrides of PEAK_TFLOPS
    peak_tbps: float | None = None  # None: PEAK_TBPS
    json: str | None = None
    device: str = "auto"
    decode_device: str | None = None  # None: the DiT's device
    progress: bool = True


@dataclass(frozen=True)
class RowConfig:
    steps: int
    linear: str
    kv_cache: str
    async_decode: bool | None  # None: no VAE
    fusion: bool = True  # compiled elementwise steps on CUDA (longstream.fused)
    fuse_qkv: bool = True  # one self-attention q/k/v projection (longstream.model.fuse_qkv)
    attention: str = "bf16"  # "fp8": both attention matmuls in FP8 over the fp8 cache (longstream.quant.fp8_attention)

    def is_reference(self) -> bool:
        return (self.linear == "bf16" and self.kv_cache == "dense" and not self.fusion and not self.fuse_qkv
                and self.attention == "bf16")


@dataclass
class _Plan:
    """A validated request: resolved preset, sizes, device and the rows to run."""

    request: E2ERequest
    preset: Preset
    height: int
    width: int
    latent_hw: tuple[int, int]
    tokens_per_frame: int
    first_full: int  # index of the first chunk whose attention sees a full window
    first_measured: int  # first_full, or 1 (a chunk before it marks the start of the measured time)
    rows: list[RowConfig]
    peak_tflops: dict[str, float]
    peak_tbps: float
    device: torch.device
    decode_device: torch.device
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def stream(self, steps: int) -> StreamConfig:
        return dataclasses.replace(self.preset.stream, steps=steps)

    def cost(self, row: RowConfig) -> ChunkCost:
        return chunk_cost(self.preset.transformer, self.stream(row.steps), self.tokens_per_frame,
                          text_tokens=self.request.text_tokens, temporal=self.preset.vae.temporal,
                          linear=row.linear, kv_cache=row.kv_cache, element_bytes=self.dtype.itemsize)


def _items(text: str) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


def parse_list(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    """Comma-separated values of `flag`, each one of `choices`, duplicates dropped."""
    items = _items(text)
    if not items:
        raise UsageError(f"{flag} needs at least one value from {', '.join(choices)}")
    for item in items:
        if item not in choices:
            raise UsageError(f"unknown {flag} value {item!r}; choose from {', '.join(choices)}")
    return items


def parse_steps(text: str) -> list[int]:
    """Comma-separated positive step counts."""
    items = _items(text)
    if not items or not all(s.isdigit() and int(s) > 0 for s in items):
        raise UsageError(f"--steps takes positive integers separated by commas, got {text!r}")
    return [int(s) for s in items]


def parse_peaks(text: str | None) -> dict[str, float]:
    """PEAK_TFLOPS updated by "format=TFLOPS" pairs."""
    peaks = dict(PEAK_TFLOPS)
    for item in _items(text or ""):
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if name not in peaks or number <= 0:
            raise UsageError(f"--peak-tflops takes FORMAT=TFLOPS pairs with FORMAT in {', '.join(peaks)} and a "
                             f"positive number, got {item!r}")
        peaks[name] = number
    return peaks


def plan(req: E2ERequest) -> _Plan:
    """Check a request completely before any model is built."""
    preset = get_preset(req.preset)
    height = preset.height if req.height is None else req.height
    width = preset.width if req.width is None else req.width
    latent_hw = preset.latent_size(height, width)
    steps = parse_steps(req.steps) if req.steps is not None else [preset.stream.steps]
    linears = parse_list(req.linear, "--linear", MODES)
    kv_caches = parse_list(req.kv_cache, "--kv-cache", KV_CACHES)
    attentions = parse_list(req.attention, "--attention", ATTENTION_KINDS)
    if "fp8" in attentions and "fp8" not in kv_caches:
        raise UsageError("--attention fp8 reads an fp8 KV cache: add fp8 to --kv-cache")
    asyncs = [ON_OFF[a] for a in parse_list(req.async_decode, "--async-decode", list(ON_OFF))]
    fusions = [ON_OFF[f] for f in parse_list(req.fusion, "--fusion", list(ON_OFF))]
    qkvs = sorted(ON_OFF[f] for f in parse_list(req.fuse_qkv, "--fuse-qkv", list(ON_OFF)))
    if "nvfp4" in kv_caches and preset.transformer.attention_head_dim % 16:
        raise UsageError(f"--kv-cache nvfp4 needs a head dimension divisible by 16; preset {preset.name} has "
                         f"{preset.transformer.attention_head_dim}")
    stream = preset.stream
    first_full = math.ceil(stream.window_frames / stream.chunk_frames) - 1
    first_measured = max(first_full, 1)
    if req.chunks < first_measured + 2:
        raise UsageError(f"--chunks {req.chunks} is too few: the KV window ({stream.window_frames} latent frames) is "
                         f"first full at chunk {first_full + 1}; give at least {first_measured + 2} to measure two "
                         f"full-window chunks")
    if req.compile is not None and req.compile not in COMPILE_MODES:
        raise UsageError(f"unknown --compile mode {req.compile!r}; choose from {', '.join(COMPILE_MODES)}")
    if req.text_tokens < 1:
        raise UsageError(f"--text-tokens must be at least 1, got {req.text_tokens}")
    if req.peak_tbps is not None and req.peak_tbps <= 0:
        raise UsageError(f"--peak-tbps must be positive, got {req.peak_tbps}")
    if req.json:
        output_file(req.json, ".json", "--json")
    peaks = parse_peaks(req.peak_tflops)
    device = resolve_device(req.device)
    decode_device = device if req.decode_device is None else resolve_device(req.decode_device)
    if req.decode_device is not None and not req.vae:
        raise UsageError("--decode-device needs the VAE (drop --no-vae)")
    if req.vae_dtype not in ("bf16", "fp8"):
        raise UsageError(f"--vae-dtype takes bf16 or fp8, got {req.vae_dtype!r}")
    if req.vae_dtype == "fp8" and not (req.vae and has_tma(decode_device)):
        raise UsageError("--vae-dtype fp8 needs the VAE on a Hopper or datacenter Blackwell GPU")
    if req.compile is not None:
        _check_compile(req.compile, device)
    # bf16 linears and the dense cache first: their rows give the other rows' reference latents
    linears.sort(key=lambda m: m != "bf16")
    kv_caches.sort(key=lambda m: m != "dense")
    if device.type != "cuda":
        fusions = [False]  # the compiled block steps are a CUDA path
    fusions.sort()  # unfused rows first: the eager bf16 one is the reference
    rows = [RowConfig(s, lin, kv, a if req.vae else None, fu, qkv, at)  # one model per (linears, q/k/v), in order
            for lin in linears for qkv in qkvs for fu in fusions for kv in kv_caches for at in attentions
            for s in steps for a in (asyncs if req.vae else [None]) if at == "bf16" or kv == "fp8"]
    return _Plan(req, preset, height, width, latent_hw, preset.tokens_per_frame(height, width), first_full,
                 first_measured, rows, peaks, PEAK_TBPS if req.peak_tbps is None else req.peak_tbps, device,
                 decode_device)


def _check_compile(mode: str, device: torch.device) -> None:
    """Compile a one-line function, so that a missing compiler or backend is one clear error, not a traceback."""
    try:
        torch.compile(lambda x: x + 1, mode=mode)(torch.zeros(1, device=device))
    except Exception as exc:  # any failure means torch.compile cannot run here
        raise UsageError(f"--compile is not available here: {str(exc).strip().splitlines()[0]}") from None


# -- timing helpers -------------------------------------------------------------------------------------------------
class _Clock:
    """Marks on the generating stream without host syncs: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Time between two marks (after the device has been synchronized)."""
        return start.elapsed_time(end) / 1000 if self.device.type == "cuda" else end - start


def _to_host(frames: torch.Tensor) -> int:
    """Copy [1, 3, F, H, W] frames in [-1, 1] to the host as uint8 [F, H, W, 3], converted on the device as
    `video_io.frames_to_uint8` does for the MP4 writer (not imported: it needs PyAV, which the GPU machine lacks);
    returns F."""
    u8 = ((frames[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u8.permute(1, 2, 3, 0).contiguous().cpu().shape[0]


# -- one configuration --------------------------------------------------------------------------------------------
@dataclass
class _Stream:
    """What a timed stream recorded."""

    latents: list[torch.Tensor]  # per chunk, on the host, float32
    dit_s: list[float]  # DiT time per chunk
    deliveries: list[tuple[int, float]]  # per chunk: (video frames, host time on arrival)
    start: float
    peak_gib: float | None


class _Bench:
    def __init__(self, p: _Plan) -> None:
        self.p = p
        req, dev = p.request, p.device
        gen = torch.Generator().manual_seed(req.seed)
        self.text = torch.randn(1, req.text_tokens, p.preset.transformer.text_dim, generator=gen).to(dev)
        self.vae = None
        if req.vae:
            on = p.decode_device
            with torch.device(on):
                vae = build_vae(p.preset.vae.kind, dtype=p.dtype)
                self.vae = accelerate(vae, channels_last=channels_last_pays(vae), fp8=req.vae_dtype == "fp8")

    def transformer(self, linear: str, compiled: bool = True, qkv: bool = False) -> CausalWanTransformer:
        """The preset's transformer with fixed random weights in `linear` format, q/k/v fused with `qkv`, compiled
        if asked and `compiled`."""
        torch.manual_seed(0)
        with torch.device(self.p.device):
            model = CausalWanTransformer(self.p.preset.transformer)
        model = model.to(self.p.dtype).eval()
        if linear != "bf16":
            quantize_model(model, linear)
        if qkv:
            fuse_qkv(model)
        if compiled and self.p.request.compile:
            torch.compiler.reset()  # drop the graphs of the previous model
            # serialized: the async decode worker's compiled VAE steps (fused.run) must not run while it traces
            model.forward_stream = serialized(torch.compile(model.forward_stream, mode=self.p.request.compile))
        return model

    def _chunks(self, model: CausalWanTransformer, row: RowConfig, count: int,
                gen: StreamingGenerator | None = None) -> Iterator:
        gen = gen or self._generator(model, row)
        return gen.generate([ShotPlan(self.text, count)], generator=torch.Generator().manual_seed(self.p.request.seed))

    def _generator(self, model: CausalWanTransformer, row: RowConfig) -> StreamingGenerator:
        return StreamingGenerator(model, self.p.stream(row.steps), self.p.latent_hw, kv_storage=row.kv_cache,
                                  attention=row.attention)

    def _decoder(self) -> StreamingDecoder | None:
        return None if self.vae is None else StreamingDecoder(self.vae, normalized=True, frames_per_call=4)

    def profile_chunk(self, model: CausalWanTransformer, row: RowConfig) -> dict[str, float | None]:
        """Warm up through the first full-window chunk, then profile the next one (see the module docstring)."""
        detail = self.p.request.compile is None
        gen = self._generator(model, row)
        if detail:
            label_attention(gen)
        decoder = self._decoder()
        chunks = self._chunks(model, row, self.p.first_full + 2, gen)
        for _ in range(self.p.first_full + 1):
            latents = next(chunks).latents
            if decoder is not None:
                _to_host(decoder.decode(latents))
        on_gpu = self.p.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with labels(model, detail), profile(activities=activities) as prof:
            sync(self.p.device)
            start = time.perf_counter()
            latents = next(chunks).latents
            if decoder is not None:
                with record_function(LABEL[VAE]):
                    _to_host(decoder.decode(latents))
            sync(self.p.device)
            wall = time.perf_counter() - start
        chunks.close()
        result: dict[str, Any] = breakdown(prof.events(), wall, on_gpu)
        if decoder is None:
            result[VAE] = None
        if on_gpu:
            result["top_kernels"] = top_kernels(prof.events(), TOP_KERNELS)
        return result

    def stream(self, model: CausalWanTransformer, row: RowConfig) -> _Stream:
        """One timed stream of --chunks chunks, decoded as `row` says (not at all without a VAE)."""
        dev, count = self.p.device, self.p.request.chunks
        clock = _Clock(dev)
        decoder = self._decoder()
        deliveries: list[tuple[int, float]] = []
        begins, ends, latents = [], [], []

        def sink(frames: torch.Tensor) -> None:
            deliveries.append((_to_host(frames), time.perf_counter()))

        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            worker = None
            if decoder is not None and row.async_decode:
                on = self.p.decode_device
                worker = stack.enter_context(AsyncDecoder(decoder.decode, sink, max_pending=2,
                                                          device=on if on.type == "cuda" else None))
            chunks = self._chunks(model, row, count)
            for _ in range(count):
                begins.append(clock.mark())
                chunk = next(chunks)
                ends.append(clock.mark())
                latents.append(chunk.latents)
                if worker is not None:
                    worker.submit(chunk.latents)
                elif decoder is not None:
                    sink(decoder.decode(chunk.latents))
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        return _Stream([z.float().cpu() for z in latents], [clock.seconds(b, e) for b, e in zip(begins, ends)],
                       deliveries, start, peak)

    def row(self, model: CausalWanTransformer, row: RowConfig, reference: list[torch.Tensor] | None
            ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Measure one configuration against `reference` latents (None: it is the reference); returns the
        row's results and its latents."""
        p = self.p
        with fusion(row.fusion):
            parts = self.profile_chunk(model, row)
            run = self.stream(model, row)
        first = p.first_measured
        measured = range(first, p.request.chunks)
        frames = p.preset.stream.chunk_frames * p.preset.vae.temporal
        dit_chunk_s = sum(run.dit_s[i] for i in measured) / len(measured)
        video_fps = chunk_s = first_frame_s = None
        if run.deliveries:
            span = run.deliveries[-1][1] - run.deliveries[first - 1][1]
            chunk_s = span / len(measured)
            video_fps = sum(run.deliveries[i][0] for i in measured) / span
            first_frame_s = run.deliveries[0][1] - run.start
        cost = p.cost(row)
        bound = ceiling(cost, row.linear, p.peak_tflops, p.peak_tbps)
        dit_fps = frames / dit_chunk_s
        z = torch.cat(run.latents).double()
        z_ref = z if reference is None else torch.cat(reference).double()
        error = (z - z_ref).norm() / z_ref.norm()
        return {
            **dataclasses.asdict(row), "video_fps": video_fps, "dit_fps": dit_fps, "chunk_s": chunk_s,
            "dit_chunk_s": dit_chunk_s, "first_frame_s": first_frame_s, "first_chunk_s": run.dit_s[0],
            "peak_memory_gib": run.peak_gib, "latent_rel_error": error.item(), "breakdown_ms": parts,
            "roofline": {
                "flops_per_frame": cost.flops / cost.video_frames,
                "linear_flops_per_frame": cost.linear_flops / cost.video_frames,
                "attention_flops_per_frame": cost.attention_flops / cost.video_frames,
                "bytes_per_frame": cost.bytes / cost.video_frames,
                "compute_bound_fps": cost.video_frames / bound.compute_s,
                "memory_bound_fps": cost.video_frames / bound.memory_s,
                "ceiling_fps": bound.fps, "bound": bound.bound, "dit_fraction": dit_fps / bound.fps,
            },
        }, run.latents

    def reference(self, model: CausalWanTransformer, steps: int) -> list[torch.Tensor]:
        """Latents of the eager bf16 / dense-cache stream (DiT only, untimed)."""
        row = RowConfig(steps, "bf16", "dense", None, fusion=False, fuse_qkv=False)
        with fusion(False):
            return [chunk.latents.float().cpu() for chunk in self._chunks(model, row, self.p.request.chunks)]


def settings(p: _Plan) -> dict[str, Any]:
    """The JSON header: what every row shares."""
    req, s = p.request, p.preset.stream
    on_gpu = p.device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(p.device) if on_gpu else "cpu", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "preset": p.preset.name, "height": p.height, "width": p.width,
        "tokens_per_frame": p.tokens_per_frame, "chunk_frames": s.chunk_frames, "window_frames": s.window_frames,
        "sink_frames": s.sink_frames, "chunks": req.chunks, "first_measured_chunk": p.first_measured,
        "text_tokens": req.text_tokens, "seed": req.seed, "dtype": str(p.dtype).removeprefix("torch."),
        "vae": req.vae, "vae_dtype": req.vae_dtype if req.vae else None,
        "decode_device": str(p.decode_device) if req.vae else None, "compile": req.compile,
        "peak_tflops": p.peak_tflops, "peak_tbps": p.peak_tbps,
    }


def _write_json(result: dict[str, Any], path: str) -> None:
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")


def run_e2e(req: E2ERequest) -> dict[str, Any]:
    """Run every row of the request (see the module docstring); returns settings + rows, as written to --json."""
    p = plan(req)
    if req.compile is None:
        return _run_rows(p)
    from torch._dynamo.exc import FailOnRecompileLimitHit

    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        try:
            return _run_rows(p)
        except FailOnRecompileLimitHit:
            raise UsageError(f"--compile: a function needed more than {RECOMPILE_LIMIT} graphs (graph breaks repeat "
                             f"per layer, cache length and KV format); compile fewer formats per run") from None


def _run_rows(p: _Plan) -> dict[str, Any]:
    req = p.request
    bench = _Bench(p)
    result = {**settings(p), "rows": []}
    eager_refs = req.compile is None and any(r.is_reference() for r in p.rows)
    refs: dict[int, list[torch.Tensor]] = {}
    if not eager_refs:  # no row is the eager reference: generate it first
        model = bench.transformer("bf16", compiled=False)
        refs = {s: bench.reference(model, s) for s in sorted({r.steps for r in p.rows})}
    model, built = None, None
    for i, row in enumerate(p.rows):
        if (row.linear, row.fuse_qkv) != built:
            model = None
            release(p.device)
            model, built = bench.transformer(row.linear, qkv=row.fuse_qkv), (row.linear, row.fuse_qkv)
        out, latents = bench.row(model, row, refs.get(row.steps))
        if eager_refs and row.is_reference():
            refs.setdefault(row.steps, latents)
        result["rows"].append(out)
        if req.json:
            _write_json(result, req.json)
        if req.progress:
            print(f"[{i + 1}/{len(p.rows)}] {_describe(row)}: DiT {out['dit_fps']:.1f} FPS"
                  + (f", video {out['video_fps']:.1f} FPS" if out["video_fps"] is not None else ""), file=sys.stderr)
    return result


def _describe(row: RowConfig) -> str:
    decode = "" if row.async_decode is None else f", decode {'async' if row.async_decode else 'sequential'}"
    fused, qkv = ("on" if on else "off" for on in (row.fusion, row.fuse_qkv))
    return (f"{row.steps} steps, {row.linear} linears, {row.kv_cache} KV, {row.attention} attention{decode}, "
            f"fusion {fused}, fused q/k/v {qkv}")


