"""Shot files and the chunk plan."""

import pytest

from longstream.pipeline.shots import Shot, ShotError, load_shots, plan_chunks, shots_from_prompts


def test_yaml_and_jsonl(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("shots:\n  - {prompt: a red ball, seconds: 2}\n  - {prompt: a blue cube, seconds: 3.5}\n")
    assert load_shots(y) == [Shot("a red ball", 2.0), Shot("a blue cube", 3.5)]
    j = tmp_path / "s.jsonl"
    j.write_text('{"prompt": "one", "seconds": 1}\n\n{"prompt": "two", "seconds": 2}\n')
    assert load_shots(j) == [Shot("one", 1.0), Shot("two", 2.0)]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.yaml", "- {prompt: x, seconds: 0}", "positive"),
        ("a.yaml", "- {prompt: x, seconds: -2}", "positive"),
        ("a.yaml", "- {prompt: '', seconds: 2}", "non-empty"),
        ("a.yaml", "- {prompt: x}", "'seconds' is missing"),
        ("a.yaml", "- {prompt: x, seconds: 1, speed: 2}", "unknown keys"),
        ("a.yaml", "prompt: [unclosed", "YAML"),
        ("a.yaml", "just a string", "list of shots"),
        ("a.yaml", "[]", "no shots"),
        ("a.jsonl", '{"prompt": "x", "seconds": 1}\n{broken', ":2: not valid JSON"),
        ("a.jsonl", '[1, 2]', "mapping"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ShotError, match=message):
        load_shots(path)


@pytest.mark.parametrize("name,text", [
    ("s.jsonl", '{"prompt": "one", "seconds": 1}\n{"prompt": "two", "seconds": 2}\n'),
    ("s.yaml", "- {prompt: one, seconds: 1}\n- {prompt: two, seconds: 2}\n"),
])
def test_a_byte_order_mark_is_accepted(tmp_path, name, text):
    """Windows editors start UTF-8 files with a byte-order mark."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_shots(path) == [Shot("one", 1.0), Shot("two", 2.0)]


def test_missing_file(tmp_path):
    with pytest.raises(ShotError, match="no such prompt file"):
        load_shots(tmp_path / "nope.yaml")


def test_plan_covers_the_request_and_switches_at_chunk_boundaries():
    # 16 fps, chunks of 2 latent frames = 8 video frames = 0.5 s
    plan = plan_chunks([Shot("a", 2.0), Shot("b", 1.0)], fps=16, chunk_frames=2, temporal=4)
    assert plan.video_frames == 48
    latents = plan.chunks * 2
    assert 1 + 4 * (latents - 1) >= 48
    assert plan.chunks_per_shot == [4, 3]
    tiny = plan_chunks([Shot("a", 0.01), Shot("b", 0.01), Shot("c", 5)], fps=16, chunk_frames=2, temporal=4)
    assert all(n >= 1 for n in tiny.chunks_per_shot)
    with pytest.raises(ShotError, match="do not fit"):
        plan_chunks([Shot("a", 0.01), Shot("b", 0.01)], fps=16, chunk_frames=2, temporal=4)
    with pytest.raises(ShotError, match="positive"):
        shots_from_prompts(["a"], 0)
