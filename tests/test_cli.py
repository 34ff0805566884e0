"""`longstream generate` end to end on CPU, and one clear line for every kind of bad input."""

import errno
import subprocess
import sys

import pytest

from _links import link_to_existing_file
from longstream.cli import main
from longstream.pipeline.video_io import read_video_info


def run_cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "longstream.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_generate_writes_the_requested_video(tmp_path):
    out = tmp_path / "v.mp4"
    code = main(["generate", "--preset", "tiny", "--prompt", "a red ball bounces", "--seconds", "1.5", "--output", str(out),
                 "--quiet", "--width", "64", "--height", "48"])
    assert code == 0
    frames, width, height, fps = read_video_info(out)
    assert (frames, width, height, fps) == (24, 64, 48, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_async_decode_on_a_named_device_writes_the_same_video(tmp_path):
    args = ["generate", "--preset", "tiny", "--prompt", "a red ball bounces", "--seconds", "1", "--quiet",
            "--width", "32", "--height", "32"]
    assert main([*args, "--output", str(tmp_path / "a.mp4")]) == 0
    assert main([*args, "--output", str(tmp_path / "b.mp4"), "--async-decode", "--decode-device", "cpu"]) == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_bf16_vae_decode_stays_near_fp32(tmp_path):
    from longstream.pipeline.video_io import read_frames

    args = ["generate", "--preset", "tiny", "--prompt", "a red ball bounces", "--seconds", "1", "--quiet",
            "--width", "64", "--height", "48"]
    videos = {}
    for dtype in ("fp32", "bf16"):
        assert main([*args, "--output", str(tmp_path / f"{dtype}.mp4"), "--vae-dtype", dtype]) == 0
        videos[dtype] = read_frames(tmp_path / f"{dtype}.mp4").astype(float)
    gap = abs(videos["fp32"] - videos["bf16"]).mean()
    assert 0 < gap < 8, gap  # bf16 rounding shows (a few levels of 255), nothing more


@pytest.mark.parametrize("async_decode", ["--async-decode", "--no-async-decode"])
def test_an_encoder_failure_mid_video_leaves_nothing(tmp_path, monkeypatch, capsys, async_decode):
    """The MP4 is encoded on a worker thread: its error reaches the caller as one line and the partial file is
    removed."""
    from longstream.pipeline.video_io import StreamingMP4Writer

    real, calls = StreamingMP4Writer.write, []

    def failing_write(self, frames):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, frames)

    monkeypatch.setattr(StreamingMP4Writer, "write", failing_write)
    assert main(["generate", "--preset", "tiny", "--prompt", "a red ball", "--seconds", "3", "--quiet", "--width",
                 "32", "--height", "32", "--output", str(tmp_path / "v.mp4"), async_decode, "--decode-device",
                 "cpu"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["longstream: error: [Errno 28] No space left on device"]
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_termination_signals_leave_no_partial_video(tmp_path, name):
    """`kill` or a closed terminal mid-video ends the run like Ctrl-C: exit 130 and no file, hidden or not."""
    import signal
    import time

    signum = getattr(signal, name)
    # the signal's default disposition in the child, also where this run inherited SIG_IGN (under `nohup`, which
    # generate rightly keeps)
    proc = subprocess.Popen([sys.executable, "-m", "longstream.cli", "generate", "--preset", "tiny", "--prompt", "x",
                             "--seconds", "600", "--width", "32", "--height", "32", "--quiet",
                             "--output", str(tmp_path / "v.mp4")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.iterdir()), "the partial video never appeared"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_an_ignored_sighup_stays_ignored():
    """Under `nohup` (SIGHUP ignored) a closed terminal must not end the run."""
    import signal

    from longstream.cli import _interrupt_on_termination

    before, replaced = signal.signal(signal.SIGHUP, signal.SIG_IGN), {}
    try:
        replaced = _interrupt_on_termination()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.SIGHUP not in replaced
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGHUP, before)


def test_two_shot_file(tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"prompt": "a red ball", "seconds": 1}\n{"prompt": "a blue square", "seconds": 1}\n')
    out = tmp_path / "two.mp4"
    assert main(["generate", "--preset", "tiny", "--prompts", str(shots), "--output", str(out), "--quiet",
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
                            "'seconds' must be a finite number"),
    "zero length": (lambda p: ["--prompt", "x", "--seconds", "0"], "must be positive"),
    "negative length": (lambda p: ["--prompt", "x", "--seconds", "-3"], "must be positive"),
    "indivisible resolution": (lambda p: ["--prompt", "x", "--width", "100"], "not possible for preset tiny"),
    "corrupt checkpoint": (lambda p: ["--prompt", "x", *_bad_checkpoint(p)], "not a readable"),
    "wrong preset checkpoint": (lambda p: ["--prompt", "x", *_wrong_preset_checkpoint(p)], "another model"),
    "missing output folder": (lambda p: ["--prompt", "x", "--output", str(p / "no" / "o.mp4")], "does not exist"),
    "output folder is a file": (lambda p: ["--prompt", "x", "--output", str(_write(p / "f", "x") / "o.mp4")],
                                "is a file, not a folder"),
    "resolution beyond memory": (lambda p: ["--prompt", "x", "--width", str(2**24), "--height", str(2**24)],
                                 "GiB for preset tiny's KV cache alone"),
    "zero height": (lambda p: ["--prompt", "x", "--height", "0"], "not possible for preset tiny"),
    "endless video": (lambda p: ["--prompt", "x", "--seconds", "1e308"], "more than"),
    "infinite video": (lambda p: ["--prompt", "x", "--seconds", "inf"], "must be a finite number"),
    "shot without seconds": (lambda p: ["--prompts", str(_write(p / "s.yaml", "- {prompt: x}"))],
                             "'seconds' is missing"),
    "nvfp4 cache on a head size of 24": (lambda p: ["--prompt", "x", "--kv-cache", "nvfp4"], "divisible by 16"),
    "fp8 attention without the fp8 cache": (lambda p: ["--prompt", "x", "--attention", "fp8"], "add --kv-cache fp8"),
    "unsupported device": (lambda p: ["--prompt", "x", "--device", "mps"], "not supported"),
    "seconds with a shot file": (lambda p: ["--prompts", str(_write(p / "s.yaml", "- {prompt: x, seconds: 1}")),
                                            "--seconds", "3"], "--seconds is for --prompt"),
    "folder as shot file": (lambda p: ["--prompts", str(p)], "is a folder"),
    "decode device beyond the GPUs": (lambda p: ["--prompt", "x", "--decode-device", "cuda:7"], "cuda:7 asked for"),
    "decode device with sp": (lambda p: ["--prompt", "x", "--decode-device", "cpu", "--sp", "2"], "for one process"),
    "missing vae": (lambda p: ["--prompt", "x", "--vae", str(p / "nope")], "nope: no such file or folder"),
    "fp8 VAE without a Hopper GPU": (lambda p: ["--prompt", "x", "--vae-dtype", "fp8", "--device", "cpu"],
                                     "needs a Hopper or datacenter Blackwell GPU"),
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
    code = main(["generate", "--preset", "tiny", *args, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("longstream: error: ") and message in err[0]
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written


def test_generate_writes_through_a_symlinked_output(tmp_path):
    """The file a symlinked --output points to is replaced; the link stays a link."""
    link, target = link_to_existing_file(tmp_path, "videos", "v.mp4", "v.mp4")
    assert main(["generate", "--preset", "tiny", "--prompt", "a red ball", "--seconds", "0.5", "--output", str(link),
                 "--quiet", "--width", "32", "--height", "32"]) == 0
    assert link.is_symlink() and read_video_info(target)[0] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "videos"]
    assert [p.name for p in target.parent.iterdir()] == ["v.mp4"]


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "longstream.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout and "info" in result.stdout
    result = subprocess.run([sys.executable, "-m", "longstream.cli", "generate", "--help"],
                            capture_output=True, text=True)
    assert "--prompts" in result.stdout and "--steps" in result.stdout


def test_train_then_generate_from_its_checkpoint(tmp_path):
    import torch

    from longstream.train.data import write_clip

    for i in range(3):
        write_clip(tmp_path / "data", f"c{i}", torch.randn(16, 4, 2, 2), [("a red ball", 0, 4)])
    cfg = tmp_path / "train.yaml"
    cfg.write_text("objective: teacher_forcing\ndata: data\noutput: run\nsteps: 3\nbatch_size: 2\n"
                   "clip_frames: 4\nsave_every: 3\ndevice: cpu\n")
    assert main(["train", str(cfg), "--quiet"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors"
    assert ckpt.is_file()
    out = tmp_path / "t.mp4"
    assert main(["generate", "--preset", "tiny", "--prompt", "a red ball", "--seconds", "0.5", "--checkpoint", str(ckpt),
                 "--output", str(out), "--width", "32", "--height", "32", "--quiet"]) == 0
    assert read_video_info(out)[0] == 8


@pytest.mark.parametrize("settings,message", [
    ("objective: magic", "objective must be one of"),
    ("objective: flow_matching\nlr: .nan", "lr must be finite"),
    ("objective: flow_matching\nsteps: '2'", "steps must be a number"),
    ("objective: flow_matching\ndevice: mps", "not supported"),
    ("objective: teacher_forcing\nchunk_frames: abc", "chunk_frames must be a positive whole number"),
    ("objective: teacher_forcing\nchunk_frames: -2", "chunk_frames must be a positive whole number"),
])
def test_bad_train_config_is_one_line(tmp_path, capsys, settings, message):
    import torch

    from longstream.train.data import write_clip

    write_clip(tmp_path / "d", "c", torch.randn(16, 8, 2, 2), [("x", 0, 8)])
    cfg = tmp_path / "t.yaml"
    cfg.write_text(settings + "\ndata: d\noutput: o\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_lora_merge_command(tmp_path):
    import torch

    from longstream.config import get_preset
    from longstream.model.checkpoints import load_transformer, save_transformer
    from longstream.model.lora import LoRAConfig, inject_lora, merge_lora, save_lora
    from longstream.model.transformer import CausalWanTransformer

    model = CausalWanTransformer(get_preset("tiny").transformer).eval()
    save_transformer(model, tmp_path / "base.safetensors")
    inject_lora(model, LoRAConfig(rank=4, alpha=4.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(model, tmp_path / "l.safetensors")
    merge_lora(model)
    assert main(["lora", "merge", str(tmp_path / "base.safetensors"), str(tmp_path / "l.safetensors"),
                 str(tmp_path / "merged.safetensors")]) == 0
    merged = load_transformer(tmp_path / "merged.safetensors").eval()
    x, t, e = torch.randn(1, 16, 2, 4, 4), torch.rand(1) * 1000, torch.randn(1, 3, 64)
    with torch.no_grad():
        assert torch.allclose(merged(x, t, e), model(x, t, e), rtol=1e-5, atol=1e-6)


def _weights(path, fmt):
    """A safetensors file of longstream format `fmt` (its header is what the format checks read)."""
    import torch

    from longstream.safetensors_io import save_atomic

    save_atomic({"w": torch.zeros(1)}, path, {"longstream_format": fmt} if fmt else None)
    return str(path)


def _train_from_a_vae(p):
    """A teacher-forcing config whose init is a VAE file (the output of a vae run)."""
    import torch

    from longstream.train.data import write_clip
    from longstream.vae import build_vae
    from longstream.vae.checkpoints import save_vae

    write_clip(p / "d", "c", torch.randn(16, 4, 2, 2), [("x", 0, 4)])
    save_vae(build_vae("tiny", seed=0), p / "vae.safetensors")
    cfg = _write(p / "t.yaml", "objective: teacher_forcing\ndata: d\noutput: o\nclip_frames: 4\ninit: vae.safetensors\n"
                 "device: cpu\n")
    return ["train", str(cfg)]


OTHER_BAD = {  # commands other than generate: the output is checked before any work
    "eval json to a folder": (lambda p: ["eval", "--json", str(p)], "is a folder"),
    "train a folder": (lambda p: ["train", str(p)], "is a folder; give its YAML config file"),
    "eval with no mode": (lambda p: ["eval", "--modes", " ,"], "names no mode"),
    "eval with a missing vae": (lambda p: ["eval", "--vae", str(p / "nope.safetensors")], "no such file"),
    "merge into a missing folder": (lambda p: ["lora", "merge", "b", "l", str(p / "no" / "m.safetensors")],
                                    "does not exist"),
    "merge into a non-safetensors file": (lambda p: ["lora", "merge", "b", "l", str(p / "m.pt")],
                                          "must end in .safetensors"),
    "world over a file": (lambda p: ["world", str(p / "w"), "--vae", str(_write(p / "w", "x"))], "is a file"),
    "world with a corrupt vae": (lambda p: ["world", str(p / "new"), "--vae", str(_write(p / "v.safetensors", "x"))],
                                 "v.safetensors"),
    "world with a missing vae": (lambda p: ["world", str(p / "new"), "--vae", str(p / "nope")],
                                 "nope: no such VAE file"),
    "world with a folder as vae": (lambda p: ["world", str(p / "new"), "--vae", str(p)], "is a folder, not a VAE file"),
    "merge with base and lora swapped": (
        lambda p: ["lora", "merge", _weights(p / "l.safetensors", "lora/1"), _weights(p / "b.safetensors",
                   "transformer/1"), str(p / "m.safetensors")], "BASE and LORA are swapped"),
    "merge into a VAE": (
        lambda p: ["lora", "merge", _weights(p / "v.safetensors", "vae/1"), _weights(p / "l.safetensors", "lora/1"),
                   str(p / "m.safetensors")], "v.safetensors holds VAE weights, not a transformer checkpoint"),
    "merge a checkpoint as the lora": (
        lambda p: ["lora", "merge", _weights(p / "b.safetensors", "transformer/1"), _weights(p / "c.safetensors",
                   "transformer/1"), str(p / "m.safetensors")], "holds a transformer checkpoint, not a LoRA"),
    "merge foreign weights": (
        lambda p: ["lora", "merge", _weights(p / "b.safetensors", None), _weights(p / "l.safetensors", "lora/1"),
                   str(p / "m.safetensors")], "holds weights of no longstream format (see `longstream convert`)"),
    "train from a VAE file": (_train_from_a_vae, "vae.safetensors holds VAE weights, but objective teacher_forcing "
                              "trains a transformer"),
}


@pytest.mark.parametrize("case", sorted(OTHER_BAD))
def test_other_commands_check_their_output_first(tmp_path, case, capsys):
    make_args, message = OTHER_BAD[case]
    args = make_args(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longstream: error: ") and message in err[0], err
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written


def test_sequence_parallel_generate_under_torchrun(tmp_path):
    """Two gloo ranks under torchrun write the same video as one process (up to float rounding)."""
    import shutil

    import numpy as np

    from longstream.pipeline.video_io import read_frames

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    args = ["generate", "--preset", "tiny", "--prompt", "a red ball", "--prompt", "a blue ball", "--seconds", "1", "--quiet",
            "--width", "32", "--height", "32"]
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "longstream.cli", *args, "--sp", "2",
                             "--output", str(tmp_path / "sp.mp4")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert main([*args, "--output", str(tmp_path / "one.mp4")]) == 0
    sp, one = read_frames(tmp_path / "sp.mp4").astype(float), read_frames(tmp_path / "one.mp4").astype(float)
    assert sp.shape == one.shape == (16, 32, 32, 3)
    assert np.abs(sp - one).mean() < 1.0


def test_sp_without_torchrun_is_one_line(tmp_path, capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "x", "--sp", "2", "--output", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0]


def test_default_generate_uses_the_shipped_embedded_model(tmp_path, capsys):
    """No --preset, no --checkpoint: the embedded model's weights (128x128 at 16 fps); prompts outside its world
    get one note on stderr, prompts from its grammar none."""
    out = tmp_path / "e.mp4"
    assert main(["generate", "--prompt", "a red circle moves left on a gray background", "--seconds", "0.5",
                 "--quiet", "-o", str(out)]) == 0
    assert read_video_info(out) == (8, 128, 128, 16)
    assert capsys.readouterr().err == ""
    assert main(["generate", "--prompt", "a dog runs", "--seconds", "0.5", "--quiet", "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the embedded model's world" in err[0]


def test_train_set_overrides_the_config(tmp_path, monkeypatch):
    """--set: values read as YAML, on top of the file's; a path relative to the current directory."""
    from longstream.train.trainer import TrainConfig

    from longstream.cli import _settings

    cfg = tmp_path / "cfgs" / "t.yaml"
    cfg.parent.mkdir()
    cfg.write_text("objective: flow_matching\ndata: d\noutput: o\nlr: 0.001\nbatch_size: 4\n")
    monkeypatch.chdir(tmp_path)
    got = TrainConfig.from_yaml(cfg, _settings(["lr=0.0002", "batch_size=8", "output=runs/x", "ema=0.99"]))
    assert (got.lr, got.batch_size, got.ema) == (0.0002, 8, 0.99)
    assert got.output == str(tmp_path / "runs" / "x") and got.data == str(tmp_path / "cfgs" / "d")


@pytest.mark.parametrize("pair,message", [
    ("lr", "--set expects KEY=VALUE"),
    ("=3", "--set expects KEY=VALUE"),
    ("learning_rate=3", "--set: unknown settings learning_rate"),
    ("lr=[1,", "not a YAML value"),
])
def test_bad_train_set_is_one_line(tmp_path, capsys, pair, message):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("objective: flow_matching\ndata: d\noutput: o\n")
    assert main(["train", str(cfg), "--set", pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
