"""The embedded model's recipe: VAE training on the world, the latent world dataset, run folders as weights,
time-limited stages, and `longstream eval`'s scoring."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from longstream.errors import LongstreamError
from longstream.train.data import LatentClipDataset
from longstream.train.trainer import TrainConfig, VAETrainer, make_trainer, run_weights
from longstream.train.vae_objective import world_videos
from longstream.train.world import parse_prompt
from longstream.vae import build_vae, normalize
from longstream.vae.checkpoints import load_vae, save_vae

pytestmark = pytest.mark.usefixtures("one_thread")


def vae_config(tmp_path, **kw):
    base = dict(objective="vae", output=str(tmp_path / "vae"), preset="tiny", steps=60, batch_size=2, clip_frames=5,
                crop=16, lr=3e-3, save_every=30, log_every=10, seed=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_unclamped_decode_equals_diffusers_decode_inside_the_range():
    from longstream.train.vae_objective import decode_unclamped

    vae = build_vae("test-wan2.1", seed=8)
    z = torch.randn(2, 16, 3, 4, 4)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(100.0)  # push outputs past [-1, 1]
        ref = vae.decode(z).sample
        out = decode_unclamped(vae, z)
    assert out.shape == ref.shape and (out.abs() > 1).any()  # something to clamp, so the test can tell
    assert torch.allclose(out.clamp(-1, 1), ref, atol=1e-5)


def test_world_videos_are_deterministic_crops():
    a = world_videos(1, 5, 0, 3, 5, 128, crop=32)
    assert a.shape == (3, 3, 5, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, world_videos(1, 5, 0, 3, 5, 128, crop=32))
    assert not torch.equal(a, world_videos(1, 6, 0, 3, 5, 128, crop=32))


def test_object_weight_weighs_the_object_pixels_of_the_reconstruction_error():
    """vae_loss with object_weight equals a float64 weighted mean computed by hand from the rendered object."""
    from longstream.train.vae_objective import decode_unclamped, object_mask, vae_loss

    vae = build_vae("test-wan2.1", seed=4)
    video = world_videos(3, 0, 0, 2, 5, 64)
    mask = object_mask(video)
    key = (video[:, 0] * 1e4 + video[:, 1] * 1e2 + video[:, 2]).flatten(2)  # one number per rendered colour
    majority = key.mode(dim=2).values[..., None]  # frames hold two colours: background (most pixels) and object
    assert torch.equal(mask.flatten(3)[:, 0], key != majority)
    assert 0.01 < mask.float().mean() < 0.2
    with torch.no_grad():
        z = vae.encode(video).latent_dist
        kl = 0.5 * (z.mean.pow(2) + z.var - 1.0 - z.logvar).mean()
        e = (decode_unclamped(vae, z.mean) - video).double()
        w = 1.0 + 9.0 * mask.double().expand_as(e)
        expected = ((e.abs() + e * e) * w).sum() / w.sum() + 1e-3 * kl.double()
        plain = (e.abs() + e * e).mean() + 1e-3 * kl.double()
        weighted = vae_loss(vae, video, kl_weight=1e-3, object_weight=9.0)
        assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
        assert float(vae_loss(vae, video, kl_weight=1e-3)) == pytest.approx(float(plain), rel=1e-5)


def test_edge_weight_adds_the_spatial_gradient_error():
    """edge_error against float64 finite differences written out by hand; vae_loss with edge_weight adds exactly
    edge_weight times it, and a blurred copy of a frame has a larger edge error than a shifted-in-value one."""
    from longstream.train.vae_objective import decode_unclamped, edge_error, vae_loss

    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 3, 4, 6, 7, generator=g), torch.randn(2, 3, 4, 6, 7, generator=g)
    d = (a - b).double()
    by_hand = ((d[..., 1:, :] - d[..., :-1, :]).abs().mean() + (d[..., :, 1:] - d[..., :, :-1]).abs().mean()) / 2
    assert float(edge_error(a, b)) == pytest.approx(float(by_hand), rel=1e-6)
    video = world_videos(3, 0, 0, 2, 5, 64)
    blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert float(edge_error(blurred, video)) > 10 * float(edge_error(video + 0.1, video))  # flat offsets cost 0
    vae = build_vae("test-wan2.1", seed=4)
    with torch.no_grad():
        recon = decode_unclamped(vae, vae.encode(video).latent_dist.mean)
        plain = vae_loss(vae, video, kl_weight=1e-3, object_weight=9.0)
        edged = vae_loss(vae, video, kl_weight=1e-3, object_weight=9.0, edge_weight=2.0)
    assert float(edged - plain) == pytest.approx(2.0 * float(edge_error(recon, video)), rel=1e-4)


def test_vae_objective_learns_and_its_checkpoint_is_a_vae_file(tmp_path):
    trainer = make_trainer(vae_config(tmp_path))
    assert isinstance(trainer, VAETrainer)
    losses = trainer.run(progress=False)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    weights = run_weights(tmp_path / "vae", ("model.safetensors",))
    assert weights.parent.name == "step_00000060"
    loaded = load_vae(weights)
    for a, b in zip(loaded.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


def test_vae_width_sets_the_new_vaes_channels_and_its_file_keeps_them(tmp_path):
    trainer = make_trainer(vae_config(tmp_path, vae_width=8, steps=2, save_every=2))
    trainer.run(progress=False)
    assert trainer.model.decoder.conv_in.out_channels == 8 * 1  # base width x the last dim_mult of "tiny"
    assert trainer.model.config.base_dim == 8
    loaded = load_vae(run_weights(tmp_path / "vae", ("model.safetensors",)))
    assert loaded.config.base_dim == 8
    assert loaded.decoder.conv_in.weight.shape == trainer.model.decoder.conv_in.weight.shape


def test_vae_resume_repeats_an_uninterrupted_run(tmp_path):
    straight = make_trainer(vae_config(tmp_path, steps=4, save_every=2, output=str(tmp_path / "a"))).run(
        progress=False)
    make_trainer(vae_config(tmp_path, steps=2, save_every=2, output=str(tmp_path / "b"))).run(progress=False)
    resumed = make_trainer(vae_config(tmp_path, steps=4, save_every=2, output=str(tmp_path / "b"))).run(
        progress=False)
    assert resumed == pytest.approx(straight[2:], rel=1e-5)


def test_channels_last_vae_training_follows_the_default_layout(tmp_path):
    """Weights and clips channels-last (cuDNN's tensor-core layout) train the same VAE: 4 steps of stage-2-like
    clips (3 latent frames, warm-up drawn), equal losses and checkpoints up to float rounding."""
    kw = dict(steps=4, save_every=4, clip_frames=9, stream_warmup=2)
    plain = make_trainer(vae_config(tmp_path, output=str(tmp_path / "a"), **kw))
    last = make_trainer(vae_config(tmp_path, output=str(tmp_path / "b"), channels_last=True, **kw))
    assert last.model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not last.model.decoder.conv_in.weight.is_contiguous()
    assert last.run(progress=False) == pytest.approx(plain.run(progress=False), rel=1e-4)
    a = load_vae(run_weights(tmp_path / "a", ("model.safetensors",))).state_dict()
    b = load_vae(run_weights(tmp_path / "b", ("model.safetensors",))).state_dict()
    assert max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a) < 1e-3  # measured 8.7e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_vae_loss_keeps_the_posterior_in_at_least_float32(dtype, monkeypatch):
    """The KL is formed from float32 moments under bf16 autocast (CPU autocast here, CUDA in training: the
    encoder's moments come out bf16) and from float64 ones for a float64 VAE, whose decoder then still gets its
    own dtype (the loss equals the float32 VAE's to float32 rounding)."""
    from longstream.train import vae_objective

    seen = []
    real = vae_objective.DiagonalGaussianDistribution
    monkeypatch.setattr(vae_objective, "DiagonalGaussianDistribution",
                        lambda moments: seen.append(moments.dtype) or real(moments))
    vae = build_vae("test-wan2.1", seed=5)
    video = world_videos(4, 0, 0, 2, 9, 32)
    want = vae_objective.vae_loss(vae, video, kl_weight=1e-3, object_weight=9.0, warm=1)
    if dtype == torch.float64:
        got = vae_objective.vae_loss(vae.double(), video.double(), kl_weight=1e-3, object_weight=9.0, warm=1)
        assert seen == [torch.float32, torch.float64]
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = vae_objective.vae_loss(vae, video, kl_weight=1e-3, object_weight=9.0, warm=1)
        assert seen == [torch.float32, torch.float32] and got.dtype == torch.float32
        assert float(got) == pytest.approx(float(want), rel=2e-2) and float(got) != float(want)


@pytest.mark.gpu
def test_vae_training_with_bf16_autocast_and_channels_last_on_gpu(tmp_path):
    """The fast GPU settings train like the float32 default: 6 steps, losses within 10% (bf16 rounding, grown
    over the steps)."""
    kw = dict(steps=6, save_every=6, clip_frames=9, stream_warmup=2, device="cuda")
    plain = make_trainer(vae_config(tmp_path, output=str(tmp_path / "a"), **kw)).run(progress=False)
    fast = make_trainer(vae_config(tmp_path, output=str(tmp_path / "b"), vae_autocast=True, channels_last=True,
                                   **kw)).run(progress=False)
    assert fast == pytest.approx(plain, rel=0.1) and fast != plain


def test_max_seconds_stops_with_a_checkpoint(tmp_path):
    trainer = make_trainer(vae_config(tmp_path, steps=10_000, save_every=10_000, max_seconds=0.5))
    losses = trainer.run(progress=False)
    assert 0 < len(losses) < 10_000
    assert run_weights(tmp_path / "vae", ("model.safetensors",)).parent.name == f"step_{len(losses):08d}"


@pytest.mark.parametrize("kw,message", [
    (dict(clip_frames=6), "1 \\+ 4k"),
    (dict(crop=20), "multiple of 8"),
    (dict(objective="flow_matching"), "needs data"),
    (dict(output=""), "output"),
    (dict(vae_width=8, init="somewhere"), "with init the VAE file sets"),
    (dict(vae_width=8, objective="flow_matching", data="d"), "vae_width is for objective vae"),
    (dict(channels_last=True, objective="flow_matching", data="d"), "channels_last is for objective vae"),
    (dict(vae_autocast="yes"), "vae_autocast must be true or false"),
    (dict(vae_autocast=True), "vae_autocast is bf16 autocast on CUDA; this run's device is cpu"),
])
def test_bad_vae_settings(tmp_path, kw, message):
    with pytest.raises(LongstreamError, match=message):
        make_trainer(vae_config(tmp_path, **kw))


def test_run_weights_prefers_ema_and_reports_empty_runs(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    for step, files in ((1, ["model.safetensors", "ema.safetensors"]), (2, ["model.safetensors"])):
        folder = ckpt / f"step_{step:08d}"
        folder.mkdir(parents=True)
        for f in files + ["state.json"]:
            (folder / f).write_text("x")
    (ckpt / "step_00000003").mkdir()  # incomplete: no state.json
    assert run_weights(tmp_path / "run") == ckpt / "step_00000002" / "model.safetensors"
    assert run_weights(ckpt / "step_00000001" / "ema.safetensors").name == "ema.safetensors"
    with pytest.raises(LongstreamError, match="neither a weights file"):
        run_weights(tmp_path / "empty")


def test_world_dataset_is_normalized_and_resumable(tmp_path):
    from longstream.train.world_data import VAE_FILE, build_world_dataset

    vae = build_vae("test-wan2.1", seed=5)
    save_vae(vae, tmp_path / "vae.safetensors")
    out = build_world_dataset(tmp_path / "vae.safetensors", tmp_path / "world", clips=5, frames=9, size=32,
                              stats_clips=5, batch=2, progress=False)
    fitted = load_vae(out / VAE_FILE)
    data = LatentClipDataset(out, clip_frames=3, channels=16)
    assert len(data) == 5
    latents = torch.stack([data.load(i)[0] for i in range(5)])  # [5, 16, 3, 4, 4]
    assert latents.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-3  # the statistics are fitted on these same clips
    assert (latents.std(dim=(0, 2, 3, 4), unbiased=False) - 1).abs().max() < 1e-3
    parse_prompt(data.load(0)[1])  # prompts come from the world's grammar
    from longstream.train.world import sample_clip

    video = sample_clip(0, 9, 32)[0][None]
    with torch.no_grad():
        expected = normalize(fitted, fitted.encode(video).latent_dist.mean)
    assert torch.allclose(data.load(0)[0], expected[0], atol=1e-5)
    assert build_world_dataset(tmp_path / "vae.safetensors", out, clips=5, frames=9, size=32, stats_clips=5,
                               batch=2, progress=False) == out
    assert len((out / "clips.jsonl").read_text().splitlines()) == 5  # nothing encoded twice
    with pytest.raises(LongstreamError, match="made with size=32, now size=48"):  # a stale folder is refused
        build_world_dataset(tmp_path / "vae.safetensors", out, clips=5, frames=9, size=48, stats_clips=5,
                            progress=False)


def test_eval_scores_the_world_perfectly_and_states_chance(tmp_path):
    from longstream.eval.world_eval import eval_set, evaluate, format_table

    evals = eval_set(2, 2, seed=3)
    assert evals == eval_set(2, 2, seed=3)
    result = evaluate(evals, ["bf16"], preset_name="tiny", shot_chunks=2, device="cpu", progress=False)
    world = result["rows"]["world"]
    assert world["colour"] == world["shape"] == world["motion"] == world["switch"] == world["object_found"] == 100.0
    assert world["prompt"] == 100.0  # colour, shape and motion all right
    assert result["chance"]["colour"] == pytest.approx(100 / 7, abs=0.1)
    assert result["chance"]["prompt"] == pytest.approx(100 / (7 * 3 * 6), abs=0.1)
    assert set(result["rows"]["bf16"]) == set(result["rows"]["vae"]) == set(world)
    assert "chance" in format_table(result)
    json.dumps(result)


def test_eval_takes_a_vae_file(tmp_path):
    """--vae replaces the preset's VAE: a file whose latent channels do not fit the transformer is loaded and
    refused; a fitting one is scored and named in the settings."""
    from longstream.eval.world_eval import eval_set, evaluate

    save_vae(build_vae("test-wan2.2", seed=1), tmp_path / "wide.safetensors")
    with pytest.raises(LongstreamError, match="48 latent channels"):
        evaluate(eval_set(1, 1), ["bf16"], preset_name="tiny", vae=str(tmp_path / "wide.safetensors"),
                 shot_chunks=1, device="cpu", progress=False)
    save_vae(build_vae("tiny", seed=7), tmp_path / "v.safetensors")
    result = evaluate(eval_set(1, 1), ["bf16"], preset_name="tiny", vae=str(tmp_path / "v.safetensors"),
                      shot_chunks=1, device="cpu", progress=False)
    assert result["settings"]["vae"] == str(tmp_path / "v.safetensors") and "vae" in result["rows"]


def test_eval_rejects_unknown_modes():
    from longstream.eval.world_eval import eval_set, evaluate

    with pytest.raises(LongstreamError, match="unknown mode"):
        evaluate(eval_set(1, 1), ["int3"], preset_name="tiny", device="cpu", progress=False)


def test_decoder_fine_tune_keeps_the_encoder_and_statistics(tmp_path):
    """`trainable` with `init`: only the decoder moves; the latent space (encoder, statistics) stays."""
    vae = build_vae("tiny", seed=6)
    save_vae(vae, tmp_path / "start.safetensors", latents_mean=[0.5] * 16, latents_std=[2.0] * 16)
    trainer = make_trainer(vae_config(tmp_path, init=str(tmp_path / "start.safetensors"), steps=3, save_every=3,
                                      trainable=["post_quant_conv.*", "decoder.*"]))
    trainer.run(progress=False)
    tuned = load_vae(run_weights(tmp_path / "vae", ("model.safetensors",)))
    assert tuned.config.latents_mean == [0.5] * 16 and tuned.config.latents_std == [2.0] * 16
    before, after = vae.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(("decoder.", "post_quant")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_trainable_patterns_must_match(tmp_path):
    with pytest.raises(LongstreamError, match="match no parameter"):
        make_trainer(vae_config(tmp_path, trainable=["nothing.*"]))


def test_encoded_world_batches_equal_whole_clip_encodes(tmp_path):
    """`videos: world`: one process encodes whole clips; a latent range is encoded from its window alone."""
    from longstream.train.video_source import encode_frames, world_batch
    from longstream.vae.encode import encode_whole

    g = torch.Generator().manual_seed(2)
    save_vae(build_vae("tiny", seed=7), tmp_path / "vae.safetensors",
             latents_mean=(0.1 * torch.randn(16, generator=g)).tolist(),
             latents_std=(0.5 + torch.rand(16, generator=g)).tolist())
    videos, prompts = world_batch(1, 3, 0, [0, 1], 4, 64)
    assert videos.shape == (2, 3, 13, 64, 64) and all(parse_prompt(p) for p in prompts)
    vae = load_vae(tmp_path / "vae.safetensors")
    whole = encode_whole(vae, videos, normalized=True)
    head, head_frames = encode_frames(vae, videos, 0, 2)
    tail, tail_frames = encode_frames(vae, videos, 2, 4)
    assert (head_frames, tail_frames) == (5, 13)
    scale = whole.abs().max()
    assert (head - whole[:, :, :2]).abs().max() <= 1e-5 * scale and (tail - whole[:, :, 2:]).abs().max() <= 1e-5 * scale

    trainer = make_trainer(TrainConfig(objective="teacher_forcing", videos="world",
                                       vae=str(tmp_path / "vae.safetensors"), output=str(tmp_path / "run"),
                                       preset="tiny", steps=2, batch_size=2, clip_frames=4, chunk_frames=2,
                                       save_every=2, device="cpu", seed=1))
    latents, text = trainer._encoded_batch(3, 0)
    assert torch.equal(latents, encode_frames(trainer.vae, world_batch(1, 3, 0, [0, 1], 4, 128)[0], 0, 4)[0])
    assert text.shape[0] == 2
    losses = trainer.run(progress=False)
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)


@pytest.mark.parametrize("kw,message", [
    (dict(videos="mp4", vae="v.safetensors"), "videos must be one of world"),
    (dict(videos="world"), "with a vae file and no data"),
    (dict(videos="world", vae="v.safetensors", data="d"), "with a vae file and no data"),
    (dict(videos="world", vae="v.safetensors", objective="vae"), "videos is for flow_matching or teacher_forcing"),
    (dict(vae="v.safetensors", data="d"), "only used with videos; to start from weights use init"),
])
def test_video_config_errors(tmp_path, kw, message):
    base = dict(objective="teacher_forcing", output=str(tmp_path / "run"), preset="tiny")
    with pytest.raises(LongstreamError, match=message):
        TrainConfig(**dict(base, **kw))


def test_eval_and_model_loading_need_no_pyav():
    """The GPU machine has no PyAV: eval and model loading import without it (only writing an MP4 needs it)."""
    import subprocess
    import sys

    code = "import sys; sys.modules['av'] = None; import longstream.eval.world_eval, longstream.pipeline.generate"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_shipped_vae_streams_long_clips_without_drift():
    """The shipped VAE round-trips 129-frame world clips (streaming decode) with every frame's mean absolute error
    below 0.15. Measured 2026-12-02 with the VAE shipped since the ninth session: worst frame 0.101 (frame 2),
    a plateau of 0.063 from frame ~64 (docs/embedded.md, third run; the VAE before it reached 0.142). The first
    run's VAE, trained on 5-frame clips only, drifted to flat colour (worst frame 0.95): this catches that."""
    from longstream.assets import embedded_file
    from longstream.eval.world_eval import round_trip_error

    scenes = [parse_prompt("a yellow square moves right on a navy background"),
              parse_prompt("a green circle bounces on a black background")]
    worst = float(round_trip_error(load_vae(embedded_file("vae.safetensors")), scenes, frames=129).max())
    assert worst < 0.15, worst


@pytest.mark.parametrize("warm", [0, 1, 2, 3, 5])
def test_stream_warmup_trains_the_frames_after_it_as_diffusers_computes_them(warm):
    """encode_moments / decode_unclamped with `warm` leading latent frames equal diffusers' whole-clip encode and
    decode on the frames after them (the warm-up frames reach no weight), and vae_loss covers only those frames."""
    from longstream.train.vae_objective import (
        decode_unclamped,
        encode_moments,
        object_mask,
        vae_loss,
    )
    from longstream.vae.wan import num_video_frames

    vae = build_vae("test-wan2.1", seed=5)
    video = world_videos(4, 0, 0, 2, 21, 32)  # 6 latent frames
    with torch.no_grad():
        ref = vae.encode(video).latent_dist
        moments = encode_moments(vae, video, warm)
        assert torch.allclose(moments, ref.parameters, atol=1e-5)
        z = torch.randn_like(ref.mean) * 0.3
        frames = decode_unclamped(vae, z, warm)
        first = num_video_frames(warm)
        assert frames.shape[2] == 21 - first
        assert torch.allclose(frames.clamp(-1, 1), vae.decode(z).sample[:, :, first:], atol=1e-5)
    if warm:  # the warm-up latents reach no encoder weight
        encode_moments(vae, video, warm)[:, :, :warm].sum().backward()
        assert all(p.grad is None or not p.grad.any() for p in vae.encoder.parameters())
        vae.zero_grad(set_to_none=True)
    loss = vae_loss(vae, video, kl_weight=1e-3, object_weight=9.0, warm=warm)
    loss.backward()
    loss = loss.detach()
    grads = [p.grad for p in vae.decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # the loss by hand on the kept frames, from diffusers' whole-clip decode
        e = (decode_unclamped(vae, ref.mean)[:, :, first:] - video[:, :, first:]).double()
        w = 1.0 + 9.0 * (object_mask(video[:, :, first:])).double().expand_as(e)
        kl = 0.5 * (ref.mean.pow(2) + ref.var - 1.0 - ref.logvar)[:, :, warm:].mean().double()
        expected = ((e.abs() + e * e) * w).sum() / w.sum() + 1e-3 * kl
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("warm", [0, 2, 5])
def test_decoding_in_pieces_gives_one_call_s_frames_and_gradients(warm):
    """The causal caches carry the gradient from piece to piece: pieces of 1, 3 and DECODE_PIECE latent frames
    give the frames and the decoder/latent gradients of 7-frame pieces (one call after the warm-up), float64."""
    from longstream.train.vae_objective import decode_unclamped

    vae = build_vae("test-wan2.1", seed=6).double()
    z = torch.randn(1, 16, 7, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = torch.randn(1, 3, 25 - (1 + 4 * (warm - 1) if warm else 0), 32, 32, dtype=torch.float64)
    results = []
    for piece in (7, 1, 3, None):
        vae.zero_grad(set_to_none=True)
        zp = z.clone().requires_grad_(True)
        frames = decode_unclamped(vae, zp, warm, piece=piece) if piece else decode_unclamped(vae, zp, warm)
        ((frames - target) ** 2).mean().backward()
        results.append((frames.detach(), zp.grad, [p.grad.clone() for p in vae.decoder.parameters()]))
    (ref, ref_dz, ref_dw), *others = results
    assert not ref_dz[:, :, :warm].any() and ref_dz[:, :, warm:].abs().min() > 0
    for frames, dz, dw in others:
        assert torch.allclose(frames, ref, atol=1e-12) and torch.allclose(dz, ref_dz, atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(dw, ref_dw))
    with pytest.raises(ValueError, match="piece"):
        decode_unclamped(vae, z, piece=0)


def test_draw_warm_trains_clip_starts_half_the_time():
    from longstream.train.vae_objective import draw_warm

    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_warm(28, g) for _ in range(4000)])
    assert 0.46 < float((draws == 0).float().mean()) < 0.54
    deep = draws[draws > 0]
    assert int(deep.min()) == 1 and int(deep.max()) == 28
    assert float(deep.float().mean()) == pytest.approx(14.5, abs=0.6)  # uniform over 1..28
    assert {draw_warm(0, g) for _ in range(50)} == {0}


def test_stream_warmup_must_leave_a_frame_to_train(tmp_path):
    from longstream.train.vae_objective import vae_loss

    with pytest.raises(ValueError, match="leaves no latent frame"):
        vae_loss(build_vae("test-wan2.1", seed=1), world_videos(1, 0, 0, 1, 9, 32), kl_weight=0.0, warm=3)
    with pytest.raises(LongstreamError, match="leaves no latent frame"):
        vae_config(tmp_path, clip_frames=9, stream_warmup=3)
    with pytest.raises(LongstreamError, match="objective vae"):
        TrainConfig(objective="flow_matching", output=str(tmp_path), data="x", stream_warmup=1)


def test_train_script_parses():
    """configs/embedded/train.sh is only run on the GPU machine: at least its syntax is checked here."""
    script = Path(__file__).resolve().parents[1] / "configs" / "embedded" / "train.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0


def test_export_writes_the_three_files_and_nothing_on_a_missing_input(tmp_path):
    """`export_embedded` copies the LoRA and VAE byte for byte and leaves no hidden temporary file; a missing input
    is named before anything is written."""
    from longstream import assets

    src = assets.EMBEDDED
    out = tmp_path / "export"
    assets.export_embedded(src / assets.TRANSFORMER, src / assets.LORA_2STEP, src / assets.VAE, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([assets.TRANSFORMER, assets.LORA_2STEP, assets.VAE])
    for name in (assets.LORA_2STEP, assets.VAE):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        assets.export_embedded(src / assets.TRANSFORMER, tmp_path / "nope.safetensors", src / assets.VAE,
                               tmp_path / "second")
    assert not (tmp_path / "second").exists()


def test_prompt_adherence_needs_colour_shape_and_motion_right():
    """A rendered clip scored against its own scene counts in every column; against the scene with another shape it
    still counts for colour and motion but not for `prompt` (all three)."""
    from longstream.eval.world_eval import Scorer
    from longstream.train.world import SHAPES, Scene, render_clip

    scene = Scene("red", SHAPES[0], "moves left", "gray")
    video = render_clip([scene], [33], 128, seed=4)[0]
    right, wrong_shape = Scorer(), Scorer()
    right.single(video, scene)
    wrong_shape.single(video, Scene("red", SHAPES[1], "moves left", "gray"))
    assert right.row()["prompt"] == right.row()["shape"] == 100.0
    got = wrong_shape.row()
    assert (got["colour"], got["motion"], got["shape"], got["prompt"]) == (100.0, 100.0, 0.0, 0.0)
