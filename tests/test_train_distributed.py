"""Distributed training (gloo, CPU) equals the single-process Trainer.

One launch of 2 processes, then one of 4 (torch.multiprocessing.spawn with torchrun's environment, as in
tests/_dist_workers.py), run their scenarios in order; rank 0 saves each scenario's losses (and the full gradients
of its first step) to OUT/NAME.pt, and the tests compare them with single-process runs made here on the same data
and config.
"""

from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from _dist_workers import free_port, rel
from longstream.config import ConfigError
from longstream.model.checkpoints import read_safetensors
from longstream.parallel import ParallelContext, ParallelError
from longstream.train.trainer import TrainConfig, Trainer
from longstream.vae import build_vae
from longstream.vae.checkpoints import save_vae
from test_train import make_dataset

TIMEOUT_S = 60.0
TOL = 1e-5


def settings(data: Path, output: Path, **kw) -> dict:
    base = dict(objective="teacher_forcing", data=str(data), output=str(output), preset="tiny", steps=2,
                batch_size=4, lr=2e-3, clip_frames=4, chunk_frames=2, save_every=100, log_every=1, seed=1,
                device="cpu")
    base.update(kw)
    if base.get("videos"):  # world clips encoded in the step by the VAE saved beside the dataset
        base.update(data=None, vae=str(data / "vae.safetensors"))
    return base


# the scenarios: (world size, name) -> TrainConfig settings besides data/output (steps: how many to take)
TEACHER = dict(steps=2)
VIDEOS = dict(steps=2, videos="world")
DATA_PARALLEL = dict(objective="flow_matching", steps=3, save_every=3, grad_accum=2, ema=0.9, max_grad_norm=0.05)
SCENARIOS = {
    (2, "tf_sp2"): dict(TEACHER, sp=2),
    (2, "fm_sp2_uneven"): dict(objective="flow_matching", clip_frames=3, steps=1, sp=2),
    (2, "fm_dp2"): DATA_PARALLEL,  # run(): checkpoint at step 3
    (4, "tf_dp2_sp2"): dict(TEACHER, sp=2),
    (4, "tf_sp4"): dict(TEACHER, sp=4),
    (4, "fm_dp4_resume"): dict(DATA_PARALLEL, steps=5),  # run() on a copy of fm_dp2: resumes at step 3
    (2, "tfv_sp2"): dict(VIDEOS, sp=2),
    (2, "tf_sp2_recompute"): dict(TEACHER, sp=2, activation_checkpointing=True),
    (4, "tfv_dp2_sp2"): dict(VIDEOS, sp=2),
}


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients as full tensors (a collective for sharded ones)."""
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def steps_with_grads(trainer: Trainer, steps: int) -> dict:
    """Losses of `steps` train steps and the full gradients of the first."""
    losses, grads = [], None
    for _ in range(steps):
        losses.append(trainer.train_step())
        grads = grads or full_grads(trainer.model)
    return {"losses": losses, "grads": grads}


# -- worker side ----------------------------------------------------------------------------------------------------
def _entry(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = ParallelContext.from_env(timeout_s=TIMEOUT_S, device="cpu")
    try:
        for (w, name), kw in SCENARIOS.items():
            if w != world:
                continue
            try:
                if name == "fm_dp4_resume":
                    if rank == 0:
                        shutil.copytree(Path(out) / "fm_dp2", Path(out) / name)
                    dist.barrier()
                trainer = Trainer(TrainConfig(**settings(Path(data), Path(out) / name, **kw)))
                if name.startswith("fm_dp"):  # through run(): rank 0 writes metrics and checkpoints
                    result = {"losses": trainer.run(progress=False)}
                else:
                    result = steps_with_grads(trainer, kw["steps"])
                encoded: list = [None] * world  # video frames each rank's VAE encoder ran over
                dist.all_gather_object(encoded, getattr(trainer, "encoded_frames", None))
                result["encoded"] = encoded
                trainer.close()
            except Exception:
                raise AssertionError(f"{name} failed on rank {rank}:\n{traceback.format_exc()}") from None
            if rank == 0:
                torch.save(result, Path(out) / f"{name}.pt")
    finally:
        ctx.close()


def _launch(world: int, data: Path, out: Path) -> str | None:
    try:
        mp.spawn(_entry, args=(world, free_port(), str(data), str(out)), nprocs=world, join=True)
    except Exception as exc:  # ProcessRaisedException carries the child's traceback
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("data"))
    g = torch.Generator().manual_seed(9)
    save_vae(build_vae("tiny", seed=5), root / "vae.safetensors",
             latents_mean=(0.1 * torch.randn(16, generator=g)).tolist(),
             latents_std=(0.5 + torch.rand(16, generator=g)).tolist())
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> tuple[Path, dict[int, str | None]]:
    out = tmp_path_factory.mktemp("runs")
    return out, {world: _launch(world, data, out) for world in (2, 4)}


def result(runs, world: int, name: str) -> dict:
    out, errors = runs
    path = out / f"{name}.pt"
    if not path.exists():
        pytest.fail(f"{name} left no result; the {world}-process run stopped with:\n{errors[world]}")
    return torch.load(path, weights_only=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def single(data: Path, output: Path, **kw) -> Trainer:
    """A one-process trainer (a scenario's `sp` dropped)."""
    return Trainer(TrainConfig(**settings(data, output, **{k: v for k, v in kw.items() if k != "sp"})))


def assert_same_step(got: dict, want: dict) -> None:
    assert got["losses"] == pytest.approx(want["losses"], rel=TOL, abs=0)
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert rel(got["grads"][name], grad) < TOL, name


# -- tests ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_reference(data, tmp_path_factory) -> dict:
    return steps_with_grads(single(data, tmp_path_factory.mktemp("tf_single")), TEACHER["steps"])


@pytest.mark.parametrize("world,name", [(2, "tf_sp2"), (4, "tf_dp2_sp2"), (4, "tf_sp4"), (2, "tf_sp2_recompute")])
def test_teacher_forcing_balanced_sp_equals_one_process(runs, teacher_reference, world, name):
    """Balanced SP (and FSDP2 over dp; and with the blocks recomputed in the backward pass, all-to-alls
    included) teacher forcing: the same losses for 2 steps, the same gradients."""
    assert_same_step(result(runs, world, name), teacher_reference)


@pytest.fixture(scope="module")
def video_reference(data, tmp_path_factory) -> dict:
    return steps_with_grads(single(data, tmp_path_factory.mktemp("tfv_single"), **VIDEOS), VIDEOS["steps"])


@pytest.mark.parametrize("world,name", [(2, "tfv_sp2"), (4, "tfv_dp2_sp2")])
def test_ranks_encode_only_their_slice_and_train_like_one_process(runs, video_reference, world, name):
    """World clips encoded in the step: each SP rank encodes its Balanced SP slice (latents [0, 2) from video
    frames [0, 5), latents [2, 4) from [0, 13) as the tiny VAE's halo reaches the clip start), and the step equals
    one process encoding whole clips."""
    got = result(runs, world, name)
    assert_same_step(got, video_reference)
    steps = VIDEOS["steps"]
    assert got["encoded"] == [5 * steps, 13 * steps] * (world // 2)


def test_flow_matching_sp_with_uneven_frames_equals_one_process(runs, data, tmp_path):
    """Contiguous frames over 2 ranks (2 + 1 frames), bidirectional Ulysses attention."""
    kw = SCENARIOS[(2, "fm_sp2_uneven")]
    assert_same_step(result(runs, 2, "fm_sp2_uneven"), steps_with_grads(single(data, tmp_path, **kw), 1))


def test_data_parallel_run_equals_one_process_and_resumes_elsewhere(runs, data, tmp_path):
    """dp = 2 (FSDP2, gradient accumulation, EMA, clipping): the same 3 losses as one process; its checkpoint holds
    the same full weights and EMA; one process, and 4 processes (dp = 4), resume from it with the losses of an
    uninterrupted run."""
    kw = dict(DATA_PARALLEL, steps=5)
    reference = single(data, tmp_path / "straight", **kw).run(progress=False)
    got = result(runs, 2, "fm_dp2")
    assert got["losses"] == pytest.approx(reference[:3], rel=TOL, abs=0)
    dp_run = runs[0] / "fm_dp2"
    for name in ("model.safetensors", "ema.safetensors"):
        mine, _ = read_safetensors(dp_run / "checkpoints" / "step_00000003" / name)
        want, _ = read_safetensors(tmp_path / "straight" / "checkpoints" / "step_00000003" / name)
        assert mine.keys() == want.keys()
        assert all(rel(mine[k], want[k]) < TOL for k in want), name
    assert len((dp_run / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 only
    assert result(runs, 4, "fm_dp4_resume")["losses"] == pytest.approx(reference[3:], rel=TOL, abs=0)
    resumed = single(data, dp_run, **kw)
    assert resumed.run(progress=False) == pytest.approx(reference[3:], rel=TOL, abs=0)


TORCHRUN_ENV = dict(RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


@pytest.mark.parametrize("world,kw,error,message", [
    (3, dict(sp=2), ConfigError, "sp 2 does not divide the 3 processes"),
    (2, dict(objective="dmd", init="x", teacher="x", sp=1), ConfigError, "objective dmd trains in one process"),
    (2, dict(batch_size=3), ConfigError, r"batch_size 3 \(the global batch\) is not divisible by dp"),
    (4, dict(sp=4, clip_frames=6), ParallelError, r"latent frames \(6\) divisible by the SP size \(4\)"),
    (8, dict(sp=8, clip_frames=8), ConfigError, "sp 8 exceeds the model's 4 attention heads"),
    (None, dict(sp=2), ParallelError, "launch with torchrun --nproc-per-node 2"),
])
def test_bad_layouts_fail_in_one_line_before_any_work(data, tmp_path, monkeypatch, world, kw, error, message):
    if world is not None:
        for key, value in dict(TORCHRUN_ENV, WORLD_SIZE=str(world)).items():
            monkeypatch.setenv(key, value)
    with pytest.raises(error, match=message) as info:
        Trainer(TrainConfig(**settings(data, tmp_path, **kw)))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


def test_sp_needs_a_sequence_objective(data, tmp_path):
    with pytest.raises(ConfigError, match="sp > 1 is for flow_matching and teacher_forcing, not objective dmd"):
        TrainConfig(**settings(data, tmp_path, objective="dmd", init="x", teacher="x", sp=2))
