"""The procedural world of the embedded model: one coloured shape moving over a plain background.

A scene is (colour, shape, motion, background); its prompt comes from the grammar
    "a {colour} {shape} {motion} on a {background} background",
e.g. "a red circle moves left on a gray background". Clips are rendered at `size` x `size` pixels, values in
[-1, 1], layout [3, F, H, W]. A multi-shot clip changes one attribute of the scene at a shot boundary while the
object keeps its position, so a shot switch is visible as exactly that change.

`measure_frames` reads a scene back from frames (no learning): the object is every pixel far from the
background colour (the per-frame median); its mean colour gives the colour, its fill ratio within its bounding
box the shape (circle ~0.79, square ~1, triangle ~0.5), and its centroid track the motion. `longstream eval`
scores generated videos with it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "white": (0.95, 0.95, 0.95),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.45, 0.45, 0.45), "navy": (0.05, 0.08, 0.3),
               "brown": (0.35, 0.22, 0.1)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "bounces", "stays still")
_VELOCITY = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
             "bounces": (0, 0), "stays still": (0, 0)}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """Inverse of `Scene.prompt`; ValueError for prompts outside the grammar."""
    words = prompt.lower().strip()
    for colour in COLOURS:
        for shape in SHAPES:
            for motion in MOTIONS:
                for bg in BACKGROUNDS:
                    if words == Scene(colour, shape, motion, bg).prompt:
                        return Scene(colour, shape, motion, bg)
    raise ValueError(f"prompt {prompt!r} is not in the world's grammar")


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(MOTIONS), rng.choice(list(BACKGROUNDS)))


def changed_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one attribute (colour, shape or motion) changed."""
    field = rng.choice(("colour", "shape", "motion"))
    options = {"colour": list(COLOURS), "shape": list(SHAPES), "motion": list(MOTIONS)}[field]
    return replace(scene, **{field: rng.choice([o for o in options if o != getattr(scene, field)])})


def _mask(shape: str, size: int, cx: torch.Tensor, cy: torch.Tensor, r: float) -> torch.Tensor:
    """[F, size, size] pixels covered by the shape centred at (cx[f], cy[f]) (float32 tensors of shape [F], on
    the device the mask is made on)."""
    pixels = torch.arange(size, device=cx.device) + 0.5
    y, x = torch.meshgrid(pixels, pixels, indexing="ij")
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (dx.abs() <= r * 0.9) & (dy.abs() <= r * 0.9)
    # triangle pointing up: inside the box, below the two slanted edges
    return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)


class ObjectTrack:
    """Position and velocity of the object, advanced one frame at a time (walls reflect it)."""

    def __init__(self, size: int, rng: random.Random, motion: str) -> None:
        self.size, self.r = size, size * 0.12
        lo, hi, mid = self.r * 1.5, size - self.r * 1.5, size / 2
        self.x, self.y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        dx, dy = _VELOCITY[motion]  # start on the side the object moves away from
        if dx:
            self.x = rng.uniform(lo, mid) if dx > 0 else rng.uniform(mid, hi)
        if dy:
            self.y = rng.uniform(lo, mid) if dy > 0 else rng.uniform(mid, hi)
        self.speed = size / 96  # pixels per frame
        self.vy = 0.0

    def step(self, motion: str) -> None:
        lo, hi = self.r, self.size - self.r
        if motion == "bounces":
            self.vy += self.speed * 0.7
            self.y += self.vy
            if self.y > hi:
                self.y, self.vy = 2 * hi - self.y, -abs(self.vy) * 0.95 - self.speed
            return
        dx, dy = _VELOCITY[motion]
        self.x = min(max(self.x + dx * self.speed, lo), hi)
        self.y = min(max(self.y + dy * self.speed, lo), hi)


def render_shot(scene: Scene, xs: list[float], ys: list[float], r: float, size: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Frames [3, F, size, size] in [-1, 1] of one scene with the object centred at (xs[f], ys[f]), rendered on
    `device` (the same values on every device: float32 products, sums and comparisons only)."""
    mask = _mask(scene.shape, size, torch.tensor(xs, device=device), torch.tensor(ys, device=device), r)
    background = torch.tensor(BACKGROUNDS[scene.background], device=device).view(3, 1, 1, 1)
    colour = torch.tensor(COLOURS[scene.colour], device=device).view(3, 1, 1, 1)
    return torch.where(mask, colour, background) * 2 - 1


def render_clip(
    scenes: list[Scene], frames_per_shot: list[int], size: int = 128, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """Video [3, F, size, size] in [-1, 1] on `device` and its shots as (prompt, start_frame, end_frame)."""
    rng = random.Random(seed)
    track = ObjectTrack(size, rng, scenes[0].motion)
    videos, shots, start = [], [], 0
    for scene, n in zip(scenes, frames_per_shot):
        xs, ys = [], []
        for _ in range(n):
            xs.append(track.x)
            ys.append(track.y)
            track.step(scene.motion)
        videos.append(render_shot(scene, xs, ys, track.r, size, device))
        shots.append((scene.prompt, start, start + n))
        start += n
    return torch.cat(videos, dim=1), shots


def sample_clip(seed: int, frames: int, size: int = 128, shots: int = 1, device: torch.device | str = "cpu"):
    """A random clip on `device`: `shots` shots of (nearly) equal length, each changing one attribute of the
    last."""
    rng = random.Random(seed)
    scenes = [random_scene(rng)]
    for _ in range(shots - 1):
        scenes.append(changed_scene(scenes[-1], rng))
    lengths = [frames // shots + (1 if i < frames % shots else 0) for i in range(shots)]
    return render_clip(scenes, lengths, size, seed, device)


@dataclass(frozen=True)
class Measurement:
    colour: str | None
    shape: str | None
    motion: str | None


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> str:
    return min(palette, key=lambda name: float(((rgb - torch.tensor(palette[name])) ** 2).sum()))


def measure_frames(video: torch.Tensor, threshold: float = 0.25) -> Measurement:
    """Read colour, shape and motion back from frames [3, F, H, W] in [-1, 1] (see the module docstring)."""
    rgb = (video.float().clamp(-1, 1) + 1) / 2
    _, f, h, w = rgb.shape
    bg = rgb.flatten(2).median(dim=2).values  # [3, F]
    diff = (rgb - bg[:, :, None, None]).abs().sum(0)  # [F, H, W]
    mask = diff > threshold
    if mask.sum() < 4:
        return Measurement(None, None, None)
    colour = _nearest(rgb.permute(1, 2, 3, 0)[mask].mean(0), COLOURS)
    fills, xs, ys = [], [], []
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for i in range(f):
        m = mask[i]
        if m.sum() < 4:
            continue
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append(float(m.sum()) / float(box))
        xs.append(float(xx[m].mean()))
        ys.append(float(yy[m].mean()))
    if not fills:
        return Measurement(colour, None, None)
    fill = sum(fills) / len(fills)
    shape = min({"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}.items(), key=lambda kv: abs(kv[1] - fill))[0]
    return Measurement(colour, shape, _motion(xs, ys, w))


def _motion(xs: list[float], ys: list[float], size: int) -> str | None:
    if len(xs) < 2:
        return None
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    travel = sum(abs(b - a) for a, b in zip(ys, ys[1:]))
    still = size * 0.02 * len(xs) / 16
    if travel > 2.5 * abs(dy) + still and travel > size * 0.1:
        return "bounces"
    if max(abs(dx), abs(dy)) < still:
        return "stays still"
    if abs(dx) >= abs(dy):
        return "moves right" if dx > 0 else "moves left"
    return "moves down" if dy > 0 else "moves up"
