"""Shot lists: prompts with lengths, from the command line or a YAML / JSONL file, and their chunk plan.

File formats (lengths in seconds of output video):
- YAML: a list of shots, or a mapping with a `shots:` list; each shot is `{prompt: str, seconds: number}`.
- JSONL: one JSON object per line, `{"prompt": "...", "seconds": 4}`; blank lines are skipped.
Both are UTF-8, with or without a byte-order mark.

Prompt switches happen at chunk boundaries: each shot starts at the chunk nearest to its start time and gets at
least one chunk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import LongstreamError


MAX_FRAMES = 10_000_000  # ~5 days at 24 fps: a guard against typos, not a limit of the engine


class ShotError(LongstreamError):
    """A shot list that cannot be used; the message says which shot and why."""


@dataclass(frozen=True)
class Shot:
    prompt: str
    seconds: float


def _shot(item: object, where: str) -> Shot:
    if not isinstance(item, dict):
        raise ShotError(f"{where}: expected a mapping with 'prompt' and 'seconds', got {type(item).__name__}")
    unknown = set(item) - {"prompt", "seconds"}
    if unknown:
        raise ShotError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    prompt, seconds = item.get("prompt"), item.get("seconds")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ShotError(f"{where}: 'prompt' must be a non-empty string")
    if seconds is None:
        raise ShotError(f"{where}: 'seconds' is missing")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ShotError(f"{where}: 'seconds' must be a finite number, got {seconds!r}")
    if seconds <= 0:
        raise ShotError(f"{where}: 'seconds' must be positive, got {seconds}")
    return Shot(prompt.strip(), float(seconds))


def load_shots(path: str | Path) -> list[Shot]:
    path = Path(path)
    if path.is_dir():
        raise ShotError(f"{path}: is a folder, not a prompt file")
    if not path.is_file():
        raise ShotError(f"{path}: no such prompt file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drops the byte-order mark Windows editors write
    except (OSError, UnicodeDecodeError) as exc:
        raise ShotError(f"{path}: cannot read ({exc})") from None
    if path.suffix.lower() == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as exc:
                    raise ShotError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ShotError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "shots" in data:
            data = data["shots"]
        if not isinstance(data, list):
            raise ShotError(f"{path}: expected a list of shots (or a mapping with a 'shots' list)")
        items = [(item, f"{path}: shot {i + 1}") for i, item in enumerate(data)]
    if not items:
        raise ShotError(f"{path}: no shots")
    return [_shot(item, where) for item, where in items]


def shots_from_prompts(prompts: list[str], seconds: float) -> list[Shot]:
    """Several prompts share `seconds` evenly."""
    if not math.isfinite(seconds):
        raise ShotError(f"--seconds must be a finite number, got {seconds}")
    if seconds <= 0:
        raise ShotError(f"--seconds must be positive, got {seconds}")
    return [_shot({"prompt": p, "seconds": seconds / len(prompts)}, f"prompt {i + 1}") for i, p in enumerate(prompts)]


@dataclass(frozen=True)
class ChunkPlan:
    chunks_per_shot: list[int]
    video_frames: int  # frames to write (the request, exactly)

    @property
    def chunks(self) -> int:
        return sum(self.chunks_per_shot)


def plan_chunks(shots: list[Shot], fps: int, chunk_frames: int, temporal: int) -> ChunkPlan:
    """Chunks per shot so that the video covers round(total seconds * fps) frames.

    A causal video VAE turns L latent frames into 1 + temporal * (L - 1) video frames."""
    total = sum(s.seconds for s in shots)
    if not math.isfinite(total * fps) or total * fps > MAX_FRAMES:
        raise ShotError(f"{total:g} seconds at {fps} fps is more than {MAX_FRAMES} frames")
    video_frames = max(1, round(total * fps))
    latents = 1 + math.ceil((video_frames - 1) / temporal)
    chunks = math.ceil(latents / chunk_frames)
    if len(shots) > chunks:
        raise ShotError(f"{len(shots)} shots do not fit in {chunks} chunks; make the video longer")
    chunk_seconds = chunk_frames * temporal / fps
    starts, t = [], 0.0
    for shot in shots:
        starts.append(round(t / chunk_seconds))
        t += shot.seconds
    for i in range(1, len(starts)):  # every shot keeps at least one chunk
        starts[i] = max(starts[i], starts[i - 1] + 1)
    for i in range(len(starts) - 1, 0, -1):
        starts[i] = min(starts[i], chunks - (len(starts) - i))
    ends = starts[1:] + [chunks]
    return ChunkPlan([e - s for s, e in zip(starts, ends)], video_frames)
