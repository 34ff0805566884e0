"""Misuse found by the CLI audit: symlinked outputs, an interrupted `longstream world`, benchmark output paths."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from _links import link_to_existing_file
from longstream.cli import main
from longstream.errors import UsageError
from longstream.paths import output_file
from longstream.safetensors_io import save_atomic

ROOT = Path(__file__).resolve().parents[1]
WORLD = dict(clips=5, frames=9, size=32, stats_clips=5, batch=2, progress=False)


def test_save_atomic_writes_through_a_symlink(tmp_path):
    link, target = link_to_existing_file(tmp_path, "store", "m.safetensors", "m.safetensors")
    save_atomic({"w": torch.ones(2)}, link)
    assert link.is_symlink() and link.resolve() == target
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]  # no temp file left
    from safetensors.torch import load_file

    assert torch.equal(load_file(target)["w"], torch.ones(2))


def test_output_file_checks_the_folder_a_symlink_points_into(tmp_path):
    link = tmp_path / "v.mp4"
    link.symlink_to(tmp_path / "gone" / "v.mp4")
    with pytest.raises(UsageError, match="gone does not exist"):
        output_file(link, ".mp4")


def _vae(tmp_path):
    from longstream.vae import build_vae
    from longstream.vae.checkpoints import save_vae

    path = tmp_path / "vae.safetensors"
    save_vae(build_vae("test-wan2.1", seed=5), path)
    return path


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_world_interrupted_before_its_data_binds_no_settings(tmp_path, monkeypatch):
    """Ctrl-C while the latent statistics are fitted leaves no data, so world.json must not refuse other settings
    on the next run."""
    from longstream.train import world_data

    vae, out = _vae(tmp_path), tmp_path / "world"
    monkeypatch.setattr(world_data, "latent_statistics", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        world_data.build_world_dataset(vae, out, **WORLD)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["world.json"]
    world_data.build_world_dataset(vae, out, **{**WORLD, "size": 48})
    assert json.loads((out / "world.json").read_text())["size"] == 48


def test_world_interrupted_among_its_clips_indexes_only_written_clips(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-encode (through the CLI): exit 130, the index lists exactly the clip files there, nothing
    half-written is left, and the next run completes the dataset without encoding a clip twice."""
    from longstream.train import world_data

    vae, out = _vae(tmp_path), tmp_path / "world"
    real, calls = world_data.write_clip, []

    def write_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(world_data, "write_clip", write_two)
    args = ["world", str(out), "--vae", str(vae), "--clips", "5", "--frames", "9", "--size", "32", "--quiet"]
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    indexed = [json.loads(line)["file"] for line in (out / "clips.jsonl").read_text().splitlines()]
    clips = sorted(p.name for p in out.glob("*.safetensors") if p.name != "vae.safetensors")
    assert indexed == clips == ["clip_00000.safetensors", "clip_00001.safetensors"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(args) == 0
    assert len((out / "clips.jsonl").read_text().splitlines()) == 5


def test_unreadable_world_settings_are_one_line(tmp_path, capsys):
    """A world.json emptied by a crash, beside data: one line, not a JSON traceback."""
    from longstream.train.world_data import build_world_dataset

    out = build_world_dataset(_vae(tmp_path), tmp_path / "world", **WORLD)
    (out / "world.json").write_text("")
    assert main(["world", str(out), "--vae", str(tmp_path / "vae.safetensors"), "--clips", "5", "--frames", "9",
                 "--size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "world.json: unreadable" in err[0], err


BENCH = {  # script: cheap arguments besides the output path (the check must come before any of the work)
    "async_decode": ["--preset", "tiny", "--chunks", "1", "--steps", "1", "--out"],
    "fp8_conv": ["--shapes", "256,256,1,4,4", "--out"],
    "gemm": ["--shapes", "64x64x64", "--out"],
    "kv_attention": ["--out"],
    "sp_inference": ["--preset", "tiny", "--device", "cpu", "--json"],
    "sp_layout": ["--out"],
    "sp_training": ["--preset", "tiny", "--json"],
    "train_step": ["--stages", "base", "--batch", "2", "--clips", "2", "--steps", "1", "--device", "cpu", "--json"],
    "vae_decode": ["--preset", "tiny", "--chunks", "1", "--layers", "plain", "--cudnn-benchmark", "off", "--json"],
    "vae_train": ["--device", "cpu", "--precision", "bf16", "--json"],
    "video_e2e": ["--preset", "tiny", "--seconds", "0.5", "--warmup-seconds", "0.5", "--steps", "4",
                  "--linear", "bf16", "--device", "cpu", "--json"],
}


@pytest.mark.parametrize("script", sorted(BENCH))
def test_bench_scripts_check_their_output_first(tmp_path, monkeypatch, capsys, script):
    spec = importlib.util.spec_from_file_location(f"bench_{script}", ROOT / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *BENCH[script], str(tmp_path / "no" / "r.json")])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("does not exist")
    assert list(tmp_path.iterdir()) == []
