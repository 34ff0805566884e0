"""`longstream generate` end to end on CPU, and one clear line for every kind of bad input."""

import subprocess
import sys

import pytest

from longstream.cli import main
from longstream.pipeline.video_io import read_video_info


def run_cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "longstream.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_generate_writes_the_requested_video(tmp_path):
    out = tmp_path / "v.mp4"
    code = main(["generate", "--prompt", "a red ball bounces", "--seconds", "1.5", "--output", str(out),
                 "--quiet", "--width", "64", "--height", "48"])
    assert code == 0
    frames, width, height, fps = read_video_info(out)
    assert (frames, width, height, fps) == (24, 64, 48, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_two_shot_file(tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"prompt": "a red ball", "seconds": 1}\n{"prompt": "a blue square", "seconds": 1}\n')
    out = tmp_path / "two.mp4"
    assert main(["generate", "--prompts", str(shots), "--output", str(out), "--quiet",
                 "--width", "32", "--height", "32"]) == 0
    assert read_video_info(out)[0] == 32


def _bad_checkpoint(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 100)
    return ["--checkpoint", str(path)]


def _wrong_preset_checkpoint(tmp_path):
    from longstream.config import get_preset
    from longstream.model.checkpoints import save_transformer
    from longstream.model.transformer import CausalWanTransformer
    import dataclasses

    cfg = dataclasses.replace(get_preset("tiny").transformer, num_layers=1)
    path = tmp_path / "other.safetensors"
    save_transformer(CausalWanTransformer(cfg), path)
    return ["--checkpoint", str(path)]


BAD = {
    "missing prompt file": (lambda p: ["--prompts", str(p / "nope.yaml")], "no such prompt file"),
    "malformed shot file": (lambda p: ["--prompts", str(_write(p / "s.yaml", "- {prompt: x, seconds: two}"))],
                            "'seconds' must be a number"),
    "zero length": (lambda p: ["--prompt", "x", "--seconds", "0"], "must be positive"),
    "negative length": (lambda p: ["--prompt", "x", "--seconds", "-3"], "must be positive"),
    "indivisible resolution": (lambda p: ["--prompt", "x", "--width", "100"], "not possible for preset tiny"),
    "corrupt checkpoint": (lambda p: ["--prompt", "x", *_bad_checkpoint(p)], "not a readable"),
    "wrong preset checkpoint": (lambda p: ["--prompt", "x", *_wrong_preset_checkpoint(p)], "another model"),
    "missing output folder": (lambda p: ["--prompt", "x", "--output", str(p / "no" / "o.mp4")], "does not exist"),
}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_no_output(tmp_path, case, capsys):
    make_args, message = BAD[case]
    args = make_args(tmp_path)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.mp4")]
    before = {p.name for p in tmp_path.iterdir()}
    code = main(["generate", *args, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("longstream: error: ") and message in err[0]
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "longstream.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout and "info" in result.stdout
    result = subprocess.run([sys.executable, "-m", "longstream.cli", "generate", "--help"],
                            capture_output=True, text=True)
    assert "--prompts" in result.stdout and "--steps" in result.stdout
