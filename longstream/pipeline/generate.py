"""`longstream generate`: validate a request, build the models, stream chunks -> frames -> MP4.

Everything the user can get wrong (prompt file, lengths, resolution, checkpoint, output path) is checked before
any model is built, and the MP4 is written atomically, so a failed or interrupted run leaves no output file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from ..config import Preset, StreamConfig, get_preset
from ..devices import has_tma, resolve_device
from ..errors import UsageError
from ..model.fuse_qkv import fuse_qkv
from ..model.transformer import CausalWanTransformer
from ..paths import output_file
from ..text.encoders import HashTextEncoder, TextEncoder
from ..vae import StreamingDecoder, build_vae
from ..vae.async_decode import AsyncDecoder
from ..vae.checkpoints import load_vae
from ..vae.fast import accelerate, channels_last_pays
from .shots import ChunkPlan, Shot, load_shots, plan_chunks, shots_from_prompts
from .stream import ShotPlan, StreamingGenerator


@dataclass
class GenerateRequest:
    output: str
    preset: str = "embedded"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    seconds: float | None = None  # with prompts: default 4
    steps: int | None = None
    seed: int = 0
    checkpoint: str | None = None
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    progress: bool = True
    kv_cache: str = "dense"
    attention: str = "bf16"  # "fp8": both attention matmuls in FP8 over an fp8 KV cache
    linear: str = "bf16"
    async_decode: bool | None = None  # None: on for CUDA
    decode_device: str | None = None  # VAE device (e.g. a second GPU); None: the generating device
    lora: str | None = None
    sp: int = 1  # sequence-parallel ranks (torchrun)
    text_encoder: str | None = None  # umT5 folder (or a diffusers pipeline folder); default: see _text_encoder
    vae: str | None = None  # diffusers VAE / pipeline folder or a longstream VAE file; default: see _vae
    offload_text_encoder: bool = False
    text_cache: str | None = None  # folder of cached prompt embeddings (umT5)
    vae_dtype: str | None = None  # "bf16" (channels-last on CUDA), "fp8" (bf16 + FP8 residual convs, Hopper) or
    # "fp32"; None: bf16 on CUDA, fp32 elsewhere


def _shots(req: GenerateRequest) -> list[Shot]:
    if req.prompts_file:
        if req.seconds is not None:
            raise UsageError("--seconds is for --prompt; a --prompts file gives each shot its length")
        return load_shots(req.prompts_file)
    if not req.prompts:
        raise UsageError("give --prompt or --prompts")
    return shots_from_prompts(req.prompts, 4.0 if req.seconds is None else req.seconds)


def _warn_outside_world(shots: list[Shot]) -> None:
    """The shipped model only knows its world's grammar: say so (once, on stderr) for other prompts."""
    from ..train.world import parse_prompt

    for shot in shots:
        try:
            parse_prompt(shot.prompt)
        except ValueError:
            print(f"longstream: note: {shot.prompt!r} is outside the embedded model's world (prompts like "
                  "\"a red circle moves left on a gray background\"; see README); generating anyway",
                  file=sys.stderr)
            return


def _transformer(req: GenerateRequest, preset: Preset, device: torch.device, dtype: torch.dtype):
    """The preset's transformer: from --checkpoint (a longstream file, plain or pre-quantized, a diffusers folder,
    original Wan safetensors or a LongLive .pt; see `longstream.convert`), else fixed random weights."""
    if req.checkpoint:
        from ..convert import load_checkpoint
        from ..quant import QuantLinear

        model = load_checkpoint(req.checkpoint, expected=preset.transformer, device=device, dtype=dtype)
        modes = sorted({m.mode for m in model.modules() if isinstance(m, QuantLinear)})
        if modes and modes != [req.linear]:
            raise UsageError(f"{req.checkpoint} holds {'/'.join(modes)} weights; pass --linear {modes[0]}")
        return model
    torch.manual_seed(0)  # the same random weights every time
    return CausalWanTransformer(preset.transformer).to(device=device, dtype=dtype)


def with_embedded_weights(req: GenerateRequest) -> GenerateRequest:
    """The embedded preset without --checkpoint uses the shipped weights (and, for 2 steps, the shipped LoRA)."""
    if req.preset != "embedded" or req.checkpoint:
        return req
    from .. import assets

    lora = req.lora or (str(assets.embedded_file(assets.LORA_2STEP)) if req.steps == 2 else None)
    return dataclasses.replace(req, checkpoint=str(assets.embedded_file(assets.TRANSFORMER)), lora=lora)


def _pipeline_folder(req: GenerateRequest) -> str | None:
    """--checkpoint when it is a diffusers pipeline folder (it then also provides the text encoder and VAE)."""
    if req.checkpoint and (Path(req.checkpoint) / "model_index.json").is_file():
        return req.checkpoint
    return None


def _vae(req: GenerateRequest, preset: Preset, device: torch.device) -> AutoencoderKLWan:
    """--vae (a longstream VAE file, or a diffusers VAE / pipeline folder), else the pipeline folder's VAE, the
    shipped one for the embedded preset, or random weights; in --vae-dtype (default bf16 on CUDA, fp32 elsewhere;
    fp8: bf16 with the residual blocks' convolutions in FP8), its convolutions channels-last where that pays
    (`channels_last_pays`: on the CPU, and in bf16 / fp8 on CUDA)."""
    bf16 = (req.vae_dtype or ("bf16" if device.type == "cuda" else "fp32")) in ("bf16", "fp8")
    dtype = torch.bfloat16 if bf16 else torch.float32
    source = req.vae or _pipeline_folder(req)
    if source and Path(source).is_file():
        vae = load_vae(source, device=device, dtype=dtype)
    elif source:
        from ..convert import load_diffusers_vae

        vae = load_diffusers_vae(source, device=device, dtype=dtype)
    elif preset.name == "embedded":
        from .. import assets

        vae = load_vae(assets.embedded_file(assets.VAE), device=device, dtype=dtype)
    else:  # the same random weights on every rank and run
        vae = build_vae(preset.vae.kind, seed=0, device=device, dtype=dtype)
    if vae.config.z_dim != preset.transformer.in_channels:
        raise UsageError(f"the VAE has {vae.config.z_dim} latent channels but preset {preset.name}'s transformer "
                         f"takes {preset.transformer.in_channels}")
    return accelerate(vae, channels_last=channels_last_pays(vae), fp8=req.vae_dtype == "fp8")


def _text_encoder(req: GenerateRequest, preset: Preset, device: torch.device) -> TextEncoder:
    """umT5 from --text-encoder (or the pipeline folder), else the fixed hash encoder (the embedded model's)."""
    source = req.text_encoder or _pipeline_folder(req)
    if not source:
        return HashTextEncoder(preset.transformer.text_dim)
    from ..text.umt5 import UMT5Encoder

    encoder = UMT5Encoder(source, device=device, offload=req.offload_text_encoder, cache_dir=req.text_cache)
    if encoder.dim != preset.transformer.text_dim:
        raise UsageError(f"text encoder {source} makes {encoder.dim}-wide embeddings but preset {preset.name} "
                         f"takes {preset.transformer.text_dim}")
    return encoder


@dataclass
class Models:
    transformer: CausalWanTransformer
    vae: AutoencoderKLWan
    encoder: TextEncoder


def load_models(req: GenerateRequest, preset: Preset, device: torch.device,
                vae_device: torch.device | None = None) -> Models:
    """Transformer (with --lora and --linear applied), VAE (on `vae_device`, default `device`) and text encoder of
    a request, in eval mode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = _text_encoder(req, preset, device)  # text encoder and VAE first: their checks are cheap
    vae = _vae(req, preset, device if vae_device is None else vae_device)
    model = _transformer(req, preset, device, dtype).eval()
    if req.lora:
        from ..model.lora import load_lora, merge_lora

        load_lora(model, req.lora)
        if req.linear == "bf16":  # fold it in: no adapter GEMMs, and q/k/v can fuse (quantized weights keep it
            merge_lora(model)  # apart: their rounding would lose most of its small update)
    if req.linear != "bf16":
        from ..quant import quantize_model

        quantize_model(model, req.linear)
    fuse_qkv(model)  # one q/k/v projection where the layers allow it (not under an fp8/nvfp4 LoRA, not nvfp4)
    return Models(model, vae, encoder)


@dataclass
class Generation:
    """A checked request with its models built: what `write_video` streams into its MP4."""

    request: GenerateRequest
    preset: Preset
    output: Path
    plan: ChunkPlan
    models: Models
    shots: list[ShotPlan]
    generator: StreamingGenerator
    decoder: StreamingDecoder
    device: torch.device  # the transformer's
    decode_device: torch.device
    writes: bool  # False on sequence-parallel ranks other than 0


def prepare(req: GenerateRequest, models: Models | None = None) -> Generation:
    """Check `req` and build its models (or reuse `models`, built for the same preset, weights and formats)."""
    given, req = req, with_embedded_weights(req)
    preset = get_preset(req.preset)
    shots = _shots(req)
    if req is not given:  # the shipped model
        _warn_outside_world(shots)
    height = preset.height if req.height is None else req.height
    width = preset.width if req.width is None else req.width
    latent_hw = preset.latent_size(height, width)
    if req.kv_cache == "nvfp4" and preset.transformer.attention_head_dim % 16:
        raise UsageError(f"--kv-cache nvfp4 needs a head dimension divisible by 16; preset {preset.name} has "
                         f"{preset.transformer.attention_head_dim}")
    if req.attention == "fp8" and req.kv_cache != "fp8":
        raise UsageError(f"--attention fp8 reads an fp8 KV cache: add --kv-cache fp8 (got {req.kv_cache})")
    if req.vae_dtype not in (None, "bf16", "fp8", "fp32"):
        raise UsageError(f"--vae-dtype must be bf16, fp8 or fp32, got {req.vae_dtype!r}")
    stream = dataclasses.replace(preset.stream, steps=req.steps or preset.stream.steps)
    plan: ChunkPlan = plan_chunks(shots, preset.fps, stream.chunk_frames, preset.vae.temporal)
    out = output_file(req.output, ".mp4")
    if req.sp < 1:
        raise UsageError(f"--sp must be >= 1, got {req.sp}")
    if req.decode_device is not None and req.sp > 1:
        raise UsageError("--decode-device is for one process; with --sp every rank decodes on its own GPU")
    shard, writes = None, True
    if req.sp > 1:
        from ..parallel import ParallelContext
        from ..parallel.stream_sp import StreamShard

        ctx = ParallelContext.from_env(sp_size=req.sp)
        if ctx.dp_size != 1:
            raise UsageError(f"generate makes one video: --sp ({req.sp}) must equal the number of processes "
                             f"({ctx.world_size})")
        device, shard, writes = ctx.device, StreamShard(ctx.sp_group, req.kv_cache), ctx.rank == 0
    else:
        device = resolve_device(req.device)
    if req.attention == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UsageError("--attention fp8 needs FP8 tensor cores (compute capability 8.9 or newer); use bf16")
    _check_cache_fits(preset, stream, height, width, req.kv_cache, req.sp, device)
    decode_device = device if req.decode_device is None else resolve_device(req.decode_device)
    if req.vae_dtype == "fp8" and not has_tma(decode_device):
        raise UsageError(f"--vae-dtype fp8 needs a Hopper or datacenter Blackwell GPU to decode on (TMA and FP8 "
                         f"tensor cores), not {decode_device}; use bf16")
    models = models or load_models(req, preset, device, decode_device)
    decoder = StreamingDecoder(models.vae, normalized=True, frames_per_call=4)
    plans = [ShotPlan(models.encoder.encode([s.prompt]), n) for s, n in zip(shots, plan.chunks_per_shot)]
    generator = StreamingGenerator(models.transformer, stream, latent_hw, kv_storage=req.kv_cache,
                                   attention=req.attention, shard=shard)
    return Generation(req, preset, out, plan, models, plans, generator, decoder, device, decode_device, writes)


def _check_cache_fits(preset: Preset, stream: StreamConfig, height: int, width: int, storage: str, sp: int,
                      device: torch.device) -> None:
    """One clear line instead of an allocation failure: the KV cache alone (keys and values of every layer over
    the attention window, this rank's heads, frame scales left out) must fit in the device's memory."""
    from ..parallel.ulysses import kv_token_bytes

    t = preset.transformer
    dense_element = 2 if device.type == "cuda" else 4  # bf16 on a GPU, float32 on the CPU
    heads = t.num_attention_heads // sp if device.type == "cuda" else t.num_attention_heads  # CPU ranks share RAM
    cache = 2 * t.num_layers * stream.window_frames * preset.tokens_per_frame(height, width) * heads \
        * kv_token_bytes(storage, t.attention_head_dim, dense_element)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf"):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:  # no way to ask (Windows): let the allocation decide
        return
    if cache > memory:
        raise UsageError(f"resolution {width}x{height} needs {cache / 2**30:.0f} GiB for preset {preset.name}'s KV "
                         f"cache alone, more than the {memory / 2**30:.0f} GiB of {device}")


def write_video(gen: Generation, on_frames: Callable[[int], None] | None = None) -> Path:
    """Stream `gen`'s chunks, decode them and write the MP4 (atomically); `on_frames(n)` follows the encoding of
    each n frames (the benchmarks' clock)."""
    req, noise = gen.request, torch.Generator().manual_seed(gen.request.seed)
    if not gen.writes:  # other sequence-parallel ranks: take part in every pass, write nothing
        for _ in gen.generator.generate(gen.shots, generator=noise):
            pass
        return gen.output

    from tqdm import tqdm

    from .video_io import StreamingMP4Writer, frames_to_uint8  # PyAV is needed to write, not to load models

    plan = gen.plan
    with StreamingMP4Writer(gen.output, gen.preset.fps) as writer, tqdm(
        total=plan.video_frames, unit="frame", disable=not req.progress, desc=gen.output.name
    ) as bar:
        remaining = plan.video_frames

        def to_host(frames: torch.Tensor) -> np.ndarray:  # decode side: trim the last chunk, uint8 on the host
            nonlocal remaining
            frames = frames[:, :, :remaining]
            remaining -= frames.shape[2]
            return frames_to_uint8(frames)

        def encode(frames: np.ndarray) -> None:
            writer.write(frames)
            bar.update(len(frames))
            if on_frames is not None:
                on_frames(len(frames))

        use_async = req.async_decode if req.async_decode is not None else gen.device.type == "cuda"
        decode = lambda latents: gen.decoder.decode(latents.float())  # noqa: E731  denormalized in fp32
        # two stages on worker threads: decode (on its own CUDA stream), then encode, each a chunk behind
        with AsyncDecoder(lambda frames: frames, encode, max_pending=2) as encode_stage, AsyncDecoder(
            decode, lambda frames: encode_stage.submit(to_host(frames)), max_pending=2,
            device=gen.decode_device if use_async else None,
        ) as decode_stage:
            for chunk in gen.generator.generate(gen.shots, generator=noise):
                if use_async:
                    decode_stage.submit(chunk.latents)
                else:
                    encode_stage.submit(to_host(decode(chunk.latents)))
                bar.set_postfix(chunk=f"{chunk.index + 1}/{plan.chunks}", shot=chunk.shot + 1)
    return gen.output


def generate_video(req: GenerateRequest) -> Path:
    return write_video(prepare(req))
