"""Wan VAE wrapper: streaming decode == whole-clip decode, chunked encode with the derived halo == whole-clip
encode (and a halo one latent shorter is not), latent normalisation, input validation. CPU, random weights."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from longstream.vae import (
    StreamingDecoder,
    build_vae,
    denormalize,
    encode_chunked,
    encode_range,
    encode_whole,
    encoder_halo_latents,
    frame_window,
    normalize,
    num_latent_frames,
    num_video_frames,
)

KINDS = ["test-wan2.1", "test-wan2.2"]
SIZE = {"test-wan2.1": 16, "test-wan2.2": 32}  # smallest frame size giving a 2x2 latent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vae(kind):
    return build_vae(kind, seed=1)


def random_video(num_latents: int, size: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, num_video_frames(num_latents), size, size, generator=g) * 2 - 1


# --- streaming decode -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks, per_call", [([1, 3, 2, 4, 1], 1), ([3, 1, 4, 3], 1), ([2, 5, 4], 3)])
def test_streaming_decode_matches_whole_clip(vae, chunks, per_call):
    z = torch.randn(2, vae.config.z_dim, sum(chunks), 2, 2)
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert (ref.abs() < 1).float().mean() > 0.5  # mostly not clamped: the comparison is informative

    dec = StreamingDecoder(vae, frames_per_call=per_call)
    outs, start = [], 0
    for i, n in enumerate(chunks):
        out = dec.decode(z[:, :, start : start + n])
        assert out.shape[:2] == (2, 3) and out.shape[3:] == ref.shape[3:]
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        outs.append(out)
        start += n
    assert dec.latents_seen == sum(chunks) and dec.frames_emitted == ref.shape[2]
    assert rel_err(torch.cat(outs, 2), ref) < 1e-5

    # The cache matters: a later chunk decoded without its history is a different video.
    fresh = StreamingDecoder(vae).decode(z[:, :, chunks[0] :])
    assert rel_err(fresh[:, :, -4:], ref[:, :, -4:]) > 1e-3


def test_streaming_reset_and_normalized(kind):
    vae = build_vae(kind, seed=3, latents_mean=torch.randn(16 if "2.1" in kind else 48).tolist(),
                    latents_std=(torch.rand(16 if "2.1" in kind else 48) + 0.5).tolist())
    z_a = torch.randn(1, vae.config.z_dim, 4, 2, 2)
    z_b = torch.randn(1, vae.config.z_dim, 5, 2, 2)
    with torch.no_grad():
        ref_b = vae.decode(z_b).sample
    dec = StreamingDecoder(vae, normalized=True)
    dec.decode(normalize(vae, z_a))
    dec.reset()
    out = torch.cat([dec.decode(normalize(vae, z_b[:, :, :2])), dec.decode(normalize(vae, z_b[:, :, 2:]))], 2)
    assert rel_err(out, ref_b) < 1e-5
    # per-call override: VAE-space latents into a normalized decoder
    dec.reset()
    assert rel_err(dec.decode(z_b, normalized=False), ref_b) < 1e-5


def test_tiny_vae_shapes():
    vae = build_vae("tiny", seed=0)
    assert vae.config.z_dim == 16 and encoder_halo_latents(vae) == 19
    out = StreamingDecoder(vae).decode(torch.randn(1, 16, 3, 2, 2))
    assert out.shape == (1, 3, 9, 16, 16)
    z = encode_whole(vae, random_video(3, 16))
    assert z.shape == (1, 16, 3, 2, 2)


# --- chunked encode with a halo ---------------------------------------------------------------------------------

def test_halo_values_from_structure():
    # Hand derivation in encoder_halo_latents' docstring: L = 28 (2 res blocks/level), 20 (1 res block/level).
    for kind, halo in [("wan2.1", 27), ("wan2.2", 27), ("tiny", 19), ("test-wan2.1", 19), ("test-wan2.2", 19)]:
        assert encoder_halo_latents(build_vae(kind, device="meta")) == halo, kind
    assert encoder_halo_latents(build_vae("test-wan2.1", device="meta", num_res_blocks=2)) == 27


def test_frame_window():
    assert frame_window(0, 3, 19) == (0, 9, 0)
    assert frame_window(5, 8, 19) == (0, 29, 5)  # short of history: a true prefix of the clip
    assert frame_window(21, 24, 19) == (4, 93, 20)  # starts at latent 1's last frame, drops dummy + halo
    assert frame_window(21, 24, 0) == (80, 93, 1)


def test_chunked_encode_matches_whole_clip(vae, kind):
    n = 26
    video = random_video(n, SIZE[kind], batch=2)
    ref = encode_whole(vae, video)
    assert ref.shape[2] == n
    ranges = [(0, 3), (3, 10), (10, 21), (21, 24), (24, 26)]
    halo = encoder_halo_latents(vae)
    assert frame_window(21, 24, halo).start > 0 and frame_window(24, 26, halo).start > 0  # truly truncated
    assert rel_err(encode_chunked(vae, video, latent_ranges=ranges), ref) < 1e-5
    assert rel_err(encode_chunked(vae, video, [5, 1, 11, 9]), ref) < 1e-5
    # a rank holding only its own window of frames
    win = frame_window(22, 26, halo)
    part = encode_range(vae, video[:, :, win.start : win.stop], 22, 26, frame_offset=win.start)
    assert rel_err(part, ref[:, :, 22:26]) < 1e-5
    assert rel_err(encode_range(vae, video, 22, 26, normalized=True), normalize(vae, ref[:, :, 22:26])) < 1e-5


def emphasize_left_taps(vae, factor: float = 4.0) -> None:
    """Scale the oldest temporal tap of every encoder conv: still random weights, but ones whose receptive-
    field edge is not attenuated to ~1e-6 as with diffusers' default init (see encoder_halo_latents)."""
    with torch.no_grad():
        for m in vae.encoder.modules():
            if isinstance(m, WanCausalConv3d) and m.weight.shape[2] == 3:
                m.weight[:, :, 0] *= factor


def test_halo_is_tight(kind):
    """Derived halo: bitwise exact; one latent less: the first kept latent misses part of its history."""
    vae = build_vae(kind, seed=1)
    emphasize_left_taps(vae)
    halo = encoder_halo_latents(vae)
    s, e = 22, 26
    video = random_video(e, SIZE[kind])
    ref = encode_whole(vae, video)[:, :, s:e]
    exact = encode_range(vae, video, s, e, halo)
    short = encode_range(vae, video, s, e, halo - 1)
    assert frame_window(s, e, halo - 1).start > 0
    assert rel_err(exact, ref) < 1e-5
    assert rel_err(short[:, :, :1], ref[:, :, :1]) > 1e-4  # measured 2.7e-1 (2.1) and 1.5e-3 (2.2)
    assert rel_err(short[:, :, 1:], ref[:, :, 1:]) < 1e-5  # only the first latent lacks history


def test_halo_is_tight_default_init_fp64(kind):
    """Same with diffusers' default init, where the receptive-field edge weighs only ~1e-7..1e-5 (relative):
    in fp64 that is far above rounding, and the derived halo is still exact."""
    vae = build_vae(kind, seed=2, dtype=torch.float64)
    halo = encoder_halo_latents(vae)
    s, e = 20, 21  # the shortest range whose chunk is truncated with halo - 1
    video = random_video(e, SIZE[kind]).double()
    ref = encode_whole(vae, video)[:, :, s:e]
    assert rel_err(encode_range(vae, video, s, e, halo), ref) < 1e-12
    # measured 1.2e-5 (2.1) and 1.4e-8 (2.2), against ~1e-16 fp64 rounding
    assert rel_err(encode_range(vae, video, s, e, halo - 1)[:, :, :1], ref[:, :, :1]) > 1e-11


# --- normalisation and validation -------------------------------------------------------------------------------

def test_normalize_roundtrip():
    vae = build_vae("wan2.1", device="meta")  # only the config (real Wan2.1 statistics) is used
    z = torch.randn(2, 16, 3, 4, 5) * 2 + 0.5
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    zn = normalize(vae, z)
    assert torch.allclose(zn * std + mean, z, atol=1e-6)
    assert torch.allclose(denormalize(vae, zn), z, atol=1e-6)
    assert torch.allclose(normalize(vae, denormalize(vae, z)), z, atol=1e-5)
    assert not torch.allclose(zn, z, atol=1e-2)
    z48 = torch.randn(1, 48, 2, 2, 2)
    v22 = build_vae("wan2.2", device="meta")
    mean22 = torch.tensor(v22.config.latents_mean).view(1, -1, 1, 1, 1)
    std22 = torch.tensor(v22.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(denormalize(v22, z48), z48 * std22 + mean22, atol=1e-6)


def test_errors(vae):
    z = torch.randn(1, vae.config.z_dim, 2, 2, 2)
    dec = StreamingDecoder(vae)
    with pytest.raises(ValueError, match="5-D"):
        dec.decode(z[0])
    with pytest.raises(ValueError, match="channels"):
        dec.decode(torch.randn(1, vae.config.z_dim + 1, 2, 2, 2))
    dec.decode(z)
    with pytest.raises(ValueError, match="reset"):
        dec.decode(torch.randn(2, vae.config.z_dim, 1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        normalize(vae, torch.randn(1, vae.config.z_dim - 1, 1, 2, 2))
    size = 16 if vae.config.z_dim == 16 else 32
    with pytest.raises(ValueError, match="5-D"):
        encode_chunked(vae, torch.randn(3, 9, size, size), 1)
    with pytest.raises(ValueError, match="channels"):
        encode_chunked(vae, torch.randn(1, 4, 9, size, size), 1)
    with pytest.raises(ValueError, match="multiple"):
        encode_whole(vae, torch.randn(1, 3, 9, size + 4, size))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_whole(vae, torch.randn(1, 3, 8, size, size))
    with pytest.raises(ValueError, match="need clip frames"):
        encode_range(vae, torch.randn(1, 3, 9, size, size), 1, 3, 0, frame_offset=4)
    with pytest.raises(ValueError, match="cover"):
        encode_chunked(vae, torch.randn(1, 3, 9, size, size), latent_ranges=[(0, 1), (2, 3)])
    with pytest.raises(ValueError, match="add up"):
        encode_chunked(vae, torch.randn(1, 3, 9, size, size), [1, 1])
    with pytest.raises(ValueError, match="unknown VAE kind"):
        build_vae("wan3")
    with pytest.raises(ValueError):
        num_latent_frames(10)
