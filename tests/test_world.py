"""The procedural world: prompts parse back, renders are measured back to their scene (no learning)."""

import pytest

from longstream.train.world import Scene, measure_frames, parse_prompt, sample_clip


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
