"""The procedural world: prompts parse back, renders are measured back to their scene (no learning)."""

import random

import pytest
import torch

from longstream.train.world import (
    BACKGROUNDS,
    COLOURS,
    ObjectTrack,
    Scene,
    measure_frames,
    parse_prompt,
    render_clip,
    sample_clip,
)


def test_measurement_recovers_rendered_scenes():
    """On 60 random single-shot clips (32 frames, 64 px) colour, shape and motion are read back (measured: all
    60 right for each attribute; the bound leaves room for a rare wall-stopped motion)."""
    hits = {"colour": 0, "shape": 0, "motion": 0}
    for seed in range(60):
        video, shots = sample_clip(seed, 32, 64)
        truth, got = parse_prompt(shots[0][0]), measure_frames(video)
        for key in hits:
            hits[key] += getattr(got, key) == getattr(truth, key)
    assert hits["colour"] == 60 and hits["shape"] >= 58 and hits["motion"] >= 57, hits


def test_multi_shot_clip_changes_one_attribute_at_the_boundary():
    for seed in range(10):
        video, shots = sample_clip(seed, 32, 64, shots=2)
        (p0, s0, e0), (p1, s1, e1) = shots
        assert (s0, e0, s1, e1) == (0, 16, 16, 32)
        a, b = parse_prompt(p0), parse_prompt(p1)
        changed = [k for k in ("colour", "shape", "motion") if getattr(a, k) != getattr(b, k)]
        assert len(changed) == 1 and a.background == b.background
        for scene, part in ((a, video[:, :16]), (b, video[:, 16:])):
            m = measure_frames(part)
            assert (m.colour, m.shape) == (scene.colour, scene.shape)


def test_prompt_grammar():
    scene = Scene("red", "circle", "moves left", "gray")
    assert parse_prompt(scene.prompt) == scene
    assert parse_prompt("  A Red Circle moves left on a gray background ") == scene
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("a red dragon flies")


def test_render_is_deterministic_and_in_range():
    a, _ = sample_clip(3, 8, 32)
    b, _ = sample_clip(3, 8, 32)
    assert a.shape == (3, 8, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert (a == b).all()


@pytest.mark.gpu
def test_render_on_the_gpu_equals_the_cpu_render():
    """Training renders its clips on the GPU: the same pixels as the CPU render, 40 random clips of two shots."""
    for seed in range(40):
        cpu, shots = sample_clip(seed, 33, 128, shots=2)
        gpu, gpu_shots = sample_clip(seed, 33, 128, shots=2, device="cuda")
        assert gpu.device.type == "cuda" and gpu_shots == shots
        assert torch.equal(gpu.cpu(), cpu)


def _inside(shape: str, dx: float, dy: float, r: float) -> bool:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return abs(dx) <= 0.9 * r and abs(dy) <= 0.9 * r
    return -r <= dy <= r and abs(dx) <= (dy + r) / 2


@pytest.mark.parametrize("seed", [0, 7])
def test_rendered_pixels_follow_the_track_and_the_shape(seed):
    """Every pixel of a 2-shot clip against a pixel-by-pixel reference: the object track stepped frame by frame,
    the pixel centre tested against the shape in float64 (pixels within 1e-4 of an edge are not compared)."""
    rng = random.Random(seed)
    scenes = [Scene("red", "circle", "bounces", "navy"), Scene("green", "triangle", "moves left", "navy")]
    if seed:
        scenes = [Scene("white", "square", "moves down", "brown"), Scene("white", "circle", "moves down", "brown")]
    size, lengths = 24, [5, 4]
    video, _ = render_clip(scenes, lengths, size, seed)
    track = ObjectTrack(size, rng, scenes[0].motion)
    compared = 0
    for f in range(sum(lengths)):
        scene = scenes[0] if f < lengths[0] else scenes[1]
        for y in range(size):
            for x in range(size):
                dx, dy = x + 0.5 - track.x, y + 0.5 - track.y
                eps = (-1e-4, 1e-4)
                nudged = {_inside(scene.shape, dx + ex, dy + ey, track.r) for ex in eps for ey in eps}
                if len(nudged) > 1:
                    continue
                rgb = COLOURS[scene.colour] if nudged.pop() else BACKGROUNDS[scene.background]
                assert video[:, f, y, x].tolist() == pytest.approx([2 * c - 1 for c in rgb], abs=1e-6), (f, y, x)
                compared += 1
        track.step(scene.motion)
    assert compared > 0.95 * size * size * sum(lengths)
