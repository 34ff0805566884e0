"""`longstream eval`: measured (not learned) scores of a model of the procedural world.

A fixed, seeded set of prompts from the world's grammar is generated in each numeric mode; the frames are read
back by `world.measure_frames` (object colour, shape and motion from pixels alone) and compared with the prompt.

- adherence: share of single-shot videos whose measured colour / shape / motion equals the prompt's, and
  `prompt`, the share whose three all do (chance: 1/7 colour, 1/3 shape, 1/6 motion, 1/126 all three, for a
  generator that ignores the prompt);
- shot switch: two-shot videos whose second prompt changes one attribute; the switch counts when that attribute,
  measured on the second shot's frames from one chunk after the switch on, equals the new prompt's
  (chance: the mean over the set of 1 / number of values of the changed attribute);
- stability: share of frames where an object is found, and flicker, the mean absolute change between
  consecutive frames (pixel values in [-1, 1]; the rendered world's own flicker is printed beside it).

The row `world` scores rendered ground-truth clips of the same prompts: the ceiling of the measurement; the row
`vae` scores the same clips after a round trip through the model's VAE (encode, then streaming decode): the
ceiling of any generator that decodes through that VAE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKLWan

from ..config import get_preset
from ..devices import resolve_device
from ..errors import UsageError
from ..paths import write_text_atomic
from ..pipeline.generate import GenerateRequest, load_models, with_embedded_weights
from ..pipeline.stream import ShotPlan, StreamingGenerator
from ..train.world import COLOURS, MOTIONS, SHAPES, Scene, changed_scene, measure_frames, random_scene, render_clip
from ..vae import StreamingDecoder
from ..vae.encode import encode_whole

# name -> (linear mode, KV-cache storage)
MODES = {"bf16": ("bf16", "dense"), "fp8": ("fp8", "dense"), "nvfp4": ("nvfp4", "dense"),
         "nvfp4-kv": ("nvfp4", "nvfp4")}
_OPTIONS = {"colour": len(COLOURS), "shape": len(SHAPES), "motion": len(MOTIONS)}


@dataclass(frozen=True)
class EvalSet:
    singles: list[Scene]
    switches: list[tuple[Scene, Scene]]


def eval_set(prompts: int, switches: int, seed: int = 0) -> EvalSet:
    rng = random.Random(seed)
    singles = [random_scene(rng) for _ in range(prompts)]
    pairs = []
    for _ in range(switches):
        first = random_scene(rng)
        pairs.append((first, changed_scene(first, rng)))
    return EvalSet(singles, pairs)


def _changed(a: Scene, b: Scene) -> str:
    return next(f for f in ("colour", "shape", "motion") if getattr(a, f) != getattr(b, f))


def flicker(video: torch.Tensor) -> float:
    """Mean |frame t - frame t-1| of [3, F, H, W] frames."""
    return float((video[:, 1:] - video[:, :-1]).abs().mean()) if video.shape[1] > 1 else 0.0


class Scorer:
    """Accumulates the scores of one row of the table."""

    def __init__(self) -> None:
        self.hits = {"colour": 0, "shape": 0, "motion": 0, "prompt": 0, "switch": 0}
        self.singles = self.switches = 0
        self.found = self.frames = 0
        self.flicker: list[float] = []

    def single(self, video: torch.Tensor, scene: Scene) -> None:
        m = measure_frames(video)
        matches = [getattr(m, field) == getattr(scene, field) for field in ("colour", "shape", "motion")]
        for field, match in zip(("colour", "shape", "motion"), matches):
            self.hits[field] += match
        self.hits["prompt"] += all(matches)
        self.singles += 1
        self._stability(video)

    def switch(self, after: torch.Tensor, before_scene: Scene, after_scene: Scene) -> None:
        field = _changed(before_scene, after_scene)
        self.hits["switch"] += getattr(measure_frames(after), field) == getattr(after_scene, field)
        self.switches += 1

    def _stability(self, video: torch.Tensor) -> None:
        for i in range(video.shape[1]):
            self.found += measure_frames(video[:, i : i + 1]).colour is not None
        self.frames += video.shape[1]
        self.flicker.append(flicker(video))

    def row(self) -> dict[str, float]:
        pct = lambda n, d: round(100.0 * n / d, 1) if d else float("nan")  # noqa: E731
        return {"colour": pct(self.hits["colour"], self.singles), "shape": pct(self.hits["shape"], self.singles),
                "motion": pct(self.hits["motion"], self.singles), "prompt": pct(self.hits["prompt"], self.singles),
                "switch": pct(self.hits["switch"], self.switches),
                "object_found": pct(self.found, self.frames),
                "flicker": round(sum(self.flicker) / max(len(self.flicker), 1), 4)}


def chance(evals: EvalSet) -> dict[str, float]:
    switch = sum(1 / _OPTIONS[_changed(a, b)] for a, b in evals.switches) / max(len(evals.switches), 1)
    return {"colour": round(100 / len(COLOURS), 1), "shape": round(100 / len(SHAPES), 1),
            "motion": round(100 / len(MOTIONS), 1), "prompt": round(100 / math.prod(_OPTIONS.values()), 1),
            "switch": round(100 * switch, 1)}


def _video(models, stream, latent_hw, kv: str, shots: list[tuple[Scene, int]], seed: int
           ) -> tuple[torch.Tensor, list[int]]:
    """Frames [3, F, H, W] of a video of `shots` (scene, chunks) and the first frame of each shot."""
    generator = StreamingGenerator(models.transformer, stream, latent_hw, kv_storage=kv)
    decoder = StreamingDecoder(models.vae, normalized=True, frames_per_call=4)
    plans = [ShotPlan(models.encoder.encode([scene.prompt]), n) for scene, n in shots]
    frames, starts, last_shot = [], [], -1
    with torch.no_grad():
        for chunk in generator.generate(plans, generator=torch.Generator().manual_seed(seed)):
            if chunk.shot != last_shot:
                starts.append(sum(f.shape[2] for f in frames))
                last_shot = chunk.shot
            frames.append(decoder.decode(chunk.latents.float()))
    return torch.cat(frames, dim=2)[0].cpu(), starts


def evaluate(evals: EvalSet, modes: list[str], *, preset_name: str = "embedded", checkpoint: str | None = None,
             vae: str | None = None, steps: int | None = None, shot_chunks: int = 8, seed: int = 0,
             device: str = "auto", progress: bool = True) -> dict:
    """Score each mode (and the rendered world); returns {"rows": {name: scores}, "chance": ..., "settings": ...}.
    `checkpoint` / `vae`: the transformer / VAE file (default: the preset's shipped or random weights)."""
    from tqdm import tqdm

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UsageError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    preset = get_preset(preset_name)
    stream = dataclasses.replace(preset.stream, steps=steps or preset.stream.steps)
    latent_hw = preset.latent_size()
    dev = resolve_device(device)
    chunk_video = stream.chunk_frames * preset.vae.temporal
    frames = shot_chunks * chunk_video
    rows = {"world": _rendered_row(evals, preset.height, frames, chunk_video, seed, lambda video: video)}
    bar = tqdm(total=(len(modes) + 1) * (len(evals.singles) + len(evals.switches)), unit="video",
               disable=not progress)  # + 1: the vae row
    for mode in modes:
        linear, kv = MODES[mode]
        req = with_embedded_weights(GenerateRequest(output="", preset=preset_name, prompts=["eval"],
                                                    checkpoint=checkpoint, vae=vae, steps=steps, linear=linear,
                                                    kv_cache=kv, vae_dtype="fp32"))  # the scores' reference precision
        models = load_models(req, preset, dev)
        if "vae" not in rows:
            rows["vae"] = _rendered_row(evals, preset.height, frames, chunk_video, seed,
                                        lambda video: _round_trip(models.vae, video))
            bar.update(len(evals.singles) + len(evals.switches))
        scorer = Scorer()
        for i, scene in enumerate(evals.singles):
            video, _ = _video(models, stream, latent_hw, kv, [(scene, shot_chunks)], seed + i)
            scorer.single(video, scene)
            bar.update(1)
        for i, (a, b) in enumerate(evals.switches):
            video, starts = _video(models, stream, latent_hw, kv, [(a, shot_chunks), (b, shot_chunks)], seed + i)
            scorer.switch(video[:, starts[1] + chunk_video :], a, b)
            bar.update(1)
        rows[mode] = scorer.row()
    bar.close()
    settings = {"preset": preset_name, "checkpoint": checkpoint or "embedded", "vae": vae or "embedded",
                "steps": stream.steps,
                "prompts": len(evals.singles), "switches": len(evals.switches), "seconds_per_shot":
                round((shot_chunks * chunk_video) / preset.fps, 2), "seed": seed}
    return {"rows": rows, "chance": chance(evals), "settings": settings}


def _round_trip(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] frames encoded by `vae` and decoded back by the streaming decoder (F = 1 + 4k)."""
    param = next(vae.parameters())
    with torch.no_grad():
        z = encode_whole(vae, video[None].to(param.device, param.dtype), normalized=True)
        return StreamingDecoder(vae, normalized=True, frames_per_call=4).decode(z)[0].float().cpu()


def round_trip_error(vae: AutoencoderKLWan, scenes: list[Scene], frames: int = 129, size: int = 128,
                     seed: int = 0) -> torch.Tensor:
    """Mean absolute error (of [-1, 1] pixels) of every frame of a rendered clip of each scene after `vae`'s
    round trip (whole-clip encode, streaming decode): [len(scenes), frames]. frames = 1 + 4k."""
    if frames < 1 or frames % 4 != 1:
        raise ValueError(f"frames must be 1 + 4k (the VAE's clip lengths), got {frames}")
    errors = []
    for i, scene in enumerate(scenes):
        video = render_clip([scene], [frames], size, seed + i)[0]
        errors.append((_round_trip(vae, video) - video).abs().mean(dim=(0, 2, 3)))
    return torch.stack(errors)


def _rendered_row(evals: EvalSet, size: int, frames: int, chunk_video: int, seed: int,
                  transform: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Scores of the rendered clips of the set after `transform` (identity: the world row). Clips get one
    extra frame so their length is 1 + 4k, the VAE's; it is dropped again before scoring."""
    scorer = Scorer()
    for i, scene in enumerate(evals.singles):
        scorer.single(transform(render_clip([scene], [frames + 1], size, seed + i)[0])[:, :frames], scene)
    for i, (a, b) in enumerate(evals.switches):
        video = transform(render_clip([a, b], [frames, frames + 1], size, seed + i)[0])
        scorer.switch(video[:, frames + chunk_video : 2 * frames], a, b)
    return scorer.row()


def format_table(result: dict) -> str:
    cols = ("colour", "shape", "motion", "prompt", "switch", "object_found", "flicker")
    lines = [f"{'mode':10s} " + " ".join(f"{c:>12s}" for c in cols)]
    for name, row in result["rows"].items():
        lines.append(f"{name:10s} " + " ".join(f"{row[c]:>12}" for c in cols))
    lines.append(f"{'chance':10s} " + " ".join(f"{result['chance'].get(c, ''):>12}" for c in cols))
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    """Write atomically (a temporary file beside it, then rename; `paths.write_text_atomic`)."""
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
