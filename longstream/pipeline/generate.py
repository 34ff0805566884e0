"""`longstream generate`: validate a request, build the models, stream chunks -> frames -> MP4.

Everything the user can get wrong (prompt file, lengths, resolution, checkpoint, output path) is checked before
any model is built, and the MP4 is written atomically, so a failed or interrupted run leaves no output file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Preset, get_preset
from ..errors import UsageError
from ..model.checkpoints import load_transformer
from ..model.transformer import CausalWanTransformer
from ..text.encoders import HashTextEncoder
from .shots import ChunkPlan, Shot, load_shots, plan_chunks, shots_from_prompts
from .stream import ShotPlan, StreamingGenerator
from .video_io import StreamingMP4Writer


@dataclass
class GenerateRequest:
    output: str
    preset: str = "tiny"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    seconds: float = 4.0
    steps: int | None = None
    seed: int = 0
    checkpoint: str | None = None
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} asked for, but no CUDA GPU is available")
    return device


def _shots(req: GenerateRequest) -> list[Shot]:
    if req.prompts_file:
        return load_shots(req.prompts_file)
    if not req.prompts:
        raise UsageError("give --prompt or --prompts")
    return shots_from_prompts(req.prompts, req.seconds)


def _output_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"output {out} must end in .mp4")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")
    return out


def _transformer(req: GenerateRequest, preset: Preset, device: torch.device, dtype: torch.dtype):
    if req.checkpoint:
        return load_transformer(req.checkpoint, expected=preset.transformer, device=device, dtype=dtype)
    torch.manual_seed(0)  # the same random weights every time
    return CausalWanTransformer(preset.transformer).to(device=device, dtype=dtype)


def generate_video(req: GenerateRequest) -> Path:
    preset = get_preset(req.preset)
    shots = _shots(req)
    height, width = req.height or preset.height, req.width or preset.width
    latent_hw = preset.latent_size(height, width)
    stream = dataclasses.replace(preset.stream, steps=req.steps or preset.stream.steps)
    plan: ChunkPlan = plan_chunks(shots, preset.fps, stream.chunk_frames, preset.vae.temporal)
    out = _output_path(req.output)
    device = resolve_device(req.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = _transformer(req, preset, device, dtype).eval()
    from ..vae.wan import StreamingDecoder, build_vae

    vae = build_vae(preset.vae.kind).to(device=device, dtype=torch.float32).eval()
    decoder = StreamingDecoder(vae)
    encoder = HashTextEncoder(preset.transformer.text_dim)
    plans = [ShotPlan(encoder.encode([s.prompt]), n) for s, n in zip(shots, plan.chunks_per_shot)]
    generator = StreamingGenerator(model, stream, latent_hw)
    noise = torch.Generator().manual_seed(req.seed)

    from tqdm import tqdm

    remaining = plan.video_frames
    with StreamingMP4Writer(out, preset.fps) as writer, tqdm(
        total=plan.video_frames, unit="frame", disable=not req.progress, desc=out.name
    ) as bar:
        for chunk in generator.generate(plans, generator=noise):
            frames = decoder.decode(chunk.latents.float(), normalized=True)[:, :, :remaining]
            writer.write(frames)
            remaining -= frames.shape[2]
            bar.set_postfix(chunk=f"{chunk.index + 1}/{plan.chunks}", shot=chunk.shot + 1)
            bar.update(frames.shape[2])
            if remaining <= 0:
                break
    return out
