"""Latent clip datasets for training.

Format (a folder):
- `clips.jsonl`: one clip per line, `{"file": "clip_00000.safetensors", "shots": [{"prompt": "...", "start": 0,
  "end": 16}, ...]}`; shots cover the clip's latent frames [0, F) in order, without gaps or overlaps;
- each clip file (safetensors) holds `latents`: [C, F, h, w] float, model-space (VAE-normalized) latents.

Everything is checked when the dataset is opened; a problem raises `DataError` naming the file (and line).
Training examples are windows of `clip_frames` latent frames inside one shot, with its prompt: each shot gives
its consecutive non-overlapping windows from its first frame on (shots shorter than `clip_frames` give none).
The order of examples is a seeded permutation per epoch, so any step's batch is known from (seed, step) alone:
a resumed run sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import LongstreamError
from ..model.checkpoints import CheckpointError, read_safetensors
from ..safetensors_io import save_atomic

INDEX = "clips.jsonl"
CACHE_BYTES = 2 << 30  # clip latents kept on the dataset's device, a GPU in training, so batches are stacked there
# (least recently used dropped first; the embedded world's 2000 clips take 0.56 GB)


class DataError(LongstreamError):
    """A dataset that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Example:
    file: Path
    prompt: str
    start: int


def _shots(entry: object, where: str) -> list[dict]:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise DataError(f"{where}: expected {{\"file\": ..., \"shots\": [...]}}")
    shots = entry.get("shots")
    if not isinstance(shots, list) or not shots:
        raise DataError(f"{where}: 'shots' must be a non-empty list")
    expected_start = 0
    for i, shot in enumerate(shots):
        ok = isinstance(shot, dict) and isinstance(shot.get("prompt"), str) and shot["prompt"].strip()
        ok = ok and all(isinstance(shot.get(k), int) and not isinstance(shot.get(k), bool) for k in ("start", "end"))
        if not ok:
            raise DataError(f"{where}: shot {i + 1} needs a non-empty 'prompt' and integer 'start', 'end'")
        if shot["start"] != expected_start or shot["end"] <= shot["start"]:
            raise DataError(f"{where}: shot {i + 1} spans [{shot['start']}, {shot['end']}) but must start at "
                            f"{expected_start} and be non-empty")
        expected_start = shot["end"]
    return shots


class LatentClipDataset:
    def __init__(self, root: str | Path, *, clip_frames: int, channels: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.root = Path(root)
        index = self.root / INDEX
        if not index.is_file():
            raise DataError(f"{self.root}: not a dataset folder (no {INDEX})")
        self.examples: list[Example] = []
        for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{index}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            shots = _shots(entry, where)
            path = self.root / entry["file"]
            shape = self._latent_shape(path)
            if len(shape) != 4 or (channels is not None and shape[0] != channels):
                want = f"[{channels}, F, h, w]" if channels is not None else "[C, F, h, w]"
                raise DataError(f"{path}: latents have shape {list(shape)}, expected {want}")
            if shots[-1]["end"] != shape[1]:
                raise DataError(f"{where}: shots end at frame {shots[-1]['end']} but {path.name} has {shape[1]}")
            for shot in shots:
                for start in range(shot["start"], shot["end"] - clip_frames + 1, clip_frames):
                    self.examples.append(Example(path, shot["prompt"].strip(), start))
        if not self.examples:
            raise DataError(f"{self.root}: no shot has {clip_frames} latent frames or more")
        self.clip_frames, self.device = clip_frames, torch.device(device)
        self._files: OrderedDict[Path, torch.Tensor] = OrderedDict()  # least recently used first
        self._cached_bytes = 0

    @staticmethod
    def _latent_shape(path: Path) -> tuple[int, ...]:
        try:
            tensors, _ = read_safetensors(path)
        except CheckpointError as exc:
            raise DataError(str(exc).replace("checkpoint", "clip file")) from None
        if "latents" not in tensors:
            raise DataError(f"{path}: no 'latents' tensor")
        return tuple(tensors["latents"].shape)

    def __len__(self) -> int:
        return len(self.examples)

    def load(self, i: int) -> tuple[torch.Tensor, str]:
        ex = self.examples[i]
        if ex.file in self._files:  # clip files are written once (atomically): a cached copy stays valid
            self._files.move_to_end(ex.file)
        else:
            latents = read_safetensors(ex.file)[0]["latents"].float().to(self.device)
            self._files[ex.file] = latents
            self._cached_bytes += latents.nbytes
            while self._cached_bytes > CACHE_BYTES and len(self._files) > 1:
                self._cached_bytes -= self._files.popitem(last=False)[1].nbytes
        return self._files[ex.file][:, ex.start : ex.start + self.clip_frames], ex.prompt

    def batch_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Indices of step `step`'s batch: consecutive items of per-epoch seeded permutations."""
        n = len(self.examples)
        out = []
        for item in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(item, n)
            out.append(_epoch_order(n, seed, epoch)[pos])
        return out


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def write_clip(root: str | Path, name: str, latents: torch.Tensor, shots: list[tuple[str, int, int]]) -> None:
    """Add a clip (latents [C, F, h, w]; shots as (prompt, start, end)) to a dataset folder: the latent file is
    written atomically before its index line, so an interrupted writer never indexes a missing or partial file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    file = f"{name}.safetensors"
    save_atomic({"latents": latents.float()}, root / file)
    entry = {"file": file, "shots": [{"prompt": p, "start": s, "end": e} for p, s, e in shots]}
    with open(root / INDEX, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
