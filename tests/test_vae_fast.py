"""The VAE's CPU fast path equals diffusers' layers; VAE files round-trip and fail with one clear line."""

import shutil

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    DupUp3D,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)

from longstream.model.checkpoints import CheckpointError
from longstream.vae import StreamingDecoder, build_vae
from longstream.vae.checkpoints import load_vae, save_vae
from longstream.vae.fast import (
    FastCausalConv3d,
    FastDupUp3D,
    FastResidualBlock,
    FastRMSNorm,
    SubPixelUpConv,
    accelerate,
    memory_format,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_accelerated_decode_equals_plain_decode():
    vae = build_vae("tiny", seed=3)
    z = torch.randn(1, 16, 5, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z).sample
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    accelerate(vae)
    assert any(type(m) is FastCausalConv3d for m in vae.modules())
    assert any(type(m) is FastRMSNorm for m in vae.modules())
    assert not any(type(m) in (WanCausalConv3d, WanRMS_norm) for m in vae.modules())
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    with torch.no_grad():
        out = vae.decode(z).sample
        streamed = torch.cat([StreamingDecoder(vae).decode(z)], dim=2)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.allclose(streamed, out, atol=1e-5)


def test_channels_last_is_chosen_on_the_cpu_for_generate_and_the_world_stage():
    from longstream.pipeline.generate import GenerateRequest, prepare
    from longstream.vae.fast import channels_last_pays

    assert channels_last_pays(build_vae("test-wan2.2", seed=0))
    assert channels_last_pays(build_vae("test-wan2.2", seed=0, dtype=torch.bfloat16))
    gen = prepare(GenerateRequest(output="unused.mp4", prompts=["a red circle stays still on a gray background"],
                                  seconds=1, device="cpu", progress=False))
    assert memory_format(gen.decoder.vae) == torch.channels_last_3d


def test_channels_last_float32_cpu_encode_and_gradients_equal_diffusers():
    """The CPU's channels-last path (oneDNN in the weights' layout, 1x1x1 convolutions following the input's):
    encoding equals diffusers' encode, and a decode's loss has diffusers' gradients (CPU VAE training)."""
    plain = build_vae("test-wan2.2", seed=6)
    fast = accelerate(build_vae("test-wan2.2", seed=6), channels_last=True)
    x = torch.randn(1, 3, 9, 32, 32)
    with torch.no_grad():
        ref = plain.encode(x).latent_dist.mean
        out = fast.encode(x).latent_dist.mean
    assert ref.abs().max() > 0.1 and (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    z = torch.randn(1, 48, 3, 2, 2)
    plain.decode(z).sample.square().mean().backward()
    fast.decode(z).sample.square().mean().backward()
    for (name, a), b in zip(plain.decoder.named_parameters(), fast.decoder.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name


def test_onednn_conv_serves_inference_and_training_on_float32_cpu(monkeypatch):
    calls = []
    real = torch.ops.aten.mkldnn_convolution
    monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", lambda *a: calls.append(1) or real(*a))
    conv = WanCausalConv3d(4, 6, 3, padding=1)
    conv.__class__ = FastCausalConv3d
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.no_grad():
        conv(x)
    conv(x).sum().backward()
    assert calls == [1, 1]
    conv.double()(x.double())  # float64: the original path
    assert calls == [1, 1]


def test_accelerated_layers_keep_gradients():
    """Gradients through the fast conv and norm equal those of diffusers' layers, for weights and inputs."""
    torch.manual_seed(1)
    plain = torch.nn.Sequential(WanCausalConv3d(4, 6, 3, padding=1), WanRMS_norm(6, images=False))
    fast = torch.nn.Sequential(WanCausalConv3d(4, 6, 3, padding=1), WanRMS_norm(6, images=False))
    fast.load_state_dict(plain.state_dict())
    fast[0].__class__, fast[1].__class__ = FastCausalConv3d, FastRMSNorm
    with torch.no_grad():
        for m in (plain, fast):
            m[1].gamma.copy_(torch.randn(6, 1, 1, 1, generator=torch.Generator().manual_seed(2)) + 1)
    x = torch.randn(2, 4, 3, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    plain(x).square().sum().backward()
    fast(x2).square().sum().backward()
    for a, b in zip(plain.parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,z_dim", [("test-wan2.1", 16), ("test-wan2.2", 48)])
@pytest.mark.parametrize("fold_bias", [False, True])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_channels_last_streaming_decode_equals_diffusers(kind, z_dim, fold_bias, dtype, tolerance, monkeypatch):
    """Fast layers with channels-last weights, streamed in 2 chunks: equal to diffusers' whole decode, also with
    the residual blocks' conv biases folded into the next norm and the residual add (CUDA's path); in float32 the
    convolutions run as oneDNN's channels-last ones (`generate`'s CPU path)."""
    # diffusers upsamples in float32 (x.float()); the reference here keeps float64 throughout
    monkeypatch.setattr(WanUpsample, "forward", torch.nn.Upsample.forward)
    monkeypatch.setattr(FastResidualBlock, "fold_bias", fold_bias)
    vae = build_vae(kind, seed=5, dtype=dtype)
    assert all(m.conv2.bias.abs().max() > 0 for m in vae.modules() if type(m) is WanResidualBlock)
    z = torch.randn(1, z_dim, 9, 4, 6, dtype=dtype)
    with torch.no_grad():
        ref = vae.decode(z).sample
        accelerate(vae, channels_last=True)
        assert any(type(m) is FastResidualBlock for m in vae.decoder.modules())
        assert memory_format(vae) == torch.channels_last_3d
        decoder = StreamingDecoder(vae, frames_per_call=4)
        out = torch.cat([decoder.decode(z[:, :, :3]), decoder.decode(z[:, :, 3:])], dim=2)
    assert ref.abs().max() > 0.1
    # not 1e-15: RMS norms over 3 channels meet near-zero norms that amplify float64 rounding
    assert (out - ref).abs().max() <= tolerance * ref.abs().max()


@pytest.mark.parametrize("c_in,c_out,factor_t", [(8, 8, 2), (8, 4, 2), (6, 6, 1), (8, 4, 1)])
@pytest.mark.parametrize("first_chunk", [False, True])
def test_fast_dup_up_equals_diffusers_and_stays_channels_last(c_in, c_out, factor_t, first_chunk):
    plain = DupUp3D(c_in, c_out, factor_t, 2)
    fast = DupUp3D(c_in, c_out, factor_t, 2)
    fast.__class__ = FastDupUp3D
    x = torch.randn(2, c_in, 3, 4, 5)
    out = fast(x.contiguous(memory_format=torch.channels_last_3d), first_chunk)
    assert torch.equal(out, plain(x, first_chunk))
    assert out.permute(0, 2, 3, 4, 1).is_contiguous() or first_chunk  # NDHWC in memory (a time slice if first)
    assert torch.equal(fast(x, first_chunk), plain(x, first_chunk))  # contiguous input: diffusers' path


NO_CXX = not any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def upsample_bodies(c_in: int, c_out: int) -> tuple[torch.nn.Sequential, SubPixelUpConv]:
    """A float64 2x nearest upsample + 3x3 conv (plain float64 upsampling, the reference) and its
    SubPixelUpConv twin with the same weights."""
    plain = torch.nn.Sequential(torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                torch.nn.Conv2d(c_in, c_out, 3, padding=1)).double()
    fast = torch.nn.Sequential(WanUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                               torch.nn.Conv2d(c_in, c_out, 3, padding=1)).double()
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = SubPixelUpConv
    return plain, fast


@pytest.mark.parametrize("h,w,channels_last,input_layout", [
    (5, 7, False, None), (4, 6, True, None), (1, 1, False, None), (3, 2, True, None),
    (4, 6, True, torch.contiguous_format),  # an NCHW input (as attention returns) to channels-last weights
])
def test_sub_pixel_upsample_conv_equals_upsample_then_conv(h, w, channels_last, input_layout):
    """Four 2x2 phase convs on the small image equal the 2x nearest upsample + 3x3 conv (float64), values and
    gradients, and keep the weights' layout."""
    torch.manual_seed(h * 10 + w)
    plain, fast = upsample_bodies(6, 5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    fast[1].weight.data = fast[1].weight.data.contiguous(memory_format=layout)
    x = torch.randn(3, 6, h, w, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().contiguous(memory_format=input_layout or layout).requires_grad_()
    ref, out = plain(x), fast(x2)
    assert out.shape == ref.shape == (3, 5, 2 * h, 2 * w)
    assert (out - ref).abs().max() < 1e-12 * ref.abs().max()
    assert out.is_contiguous(memory_format=layout)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(plain.parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_sub_pixel_phase_kernels_follow_weight_updates():
    """Inference keeps the phase kernels between calls; an in-place weight update (an optimizer step, a state-dict
    load) makes new ones."""
    torch.manual_seed(0)
    plain, fast = upsample_bodies(4, 3)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            assert torch.allclose(fast(x), plain(x), rtol=1e-12, atol=1e-12)
            for m in (plain, fast):
                m[1].weight.mul_(-1.5)
                m[1].bias.add_(0.25)


def test_accelerate_swaps_the_upsample_bodies_only():
    vae = accelerate(build_vae("test-wan2.2", seed=2))
    resamples = [m for m in vae.modules() if type(m) is WanResample]
    ups = [m for m in resamples if m.mode.startswith("upsample")]
    assert ups and all(type(m.resample) is SubPixelUpConv for m in ups)
    assert all(type(m.resample) is not SubPixelUpConv for m in resamples if m not in ups)  # the encoder's


@pytest.mark.gpu
def test_channels_last_decode_on_cuda_keeps_the_layout_and_equals_plain():
    """On CUDA every 3-D convolution of the channels-last decoder gets a channels-last input, and the frames equal
    diffusers' decode (float32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    vae = build_vae("test-wan2.2", seed=6, device="cuda")
    z = torch.randn(1, 48, 5, 6, 8, device="cuda")
    with torch.no_grad():
        ref = vae.decode(z).sample
        accelerate(vae, channels_last=True)
        layouts = []
        real = torch.nn.functional.conv3d

        def spy(x, weight, *args):
            if weight.shape[2:] == (3, 3, 3):
                layouts.append(x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous())
            return real(x, weight, *args)

        torch.nn.functional.conv3d = spy
        try:
            out = StreamingDecoder(vae, frames_per_call=4).decode(z)
        finally:
            torch.nn.functional.conv3d = real
    assert layouts and all(layouts)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_vae_file_round_trip_with_statistics(tmp_path):
    vae = build_vae("tiny", seed=4)
    mean, std = torch.randn(16).tolist(), (torch.rand(16) + 0.5).tolist()
    save_vae(vae, tmp_path / "v.safetensors", latents_mean=mean, latents_std=std)
    loaded = load_vae(tmp_path / "v.safetensors")
    assert loaded.config.latents_mean == pytest.approx(mean) and loaded.config.latents_std == pytest.approx(std)
    z = torch.randn(1, 16, 2, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)
    with pytest.raises(ValueError, match="not AutoencoderKLWan settings"):
        save_vae(vae, tmp_path / "w.safetensors", colour="blue")


@pytest.mark.parametrize("content,message", [
    (b"\x00" * 64, "not a readable"),
    (None, "not a longstream VAE file"),
])
def test_bad_vae_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is None:  # a readable safetensors file of another kind
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_vae(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
