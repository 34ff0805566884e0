import os
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _links import link_to_existing_file
from longstream.pipeline import video_io
from longstream.pipeline.video_io import StreamingMP4Writer, frames_to_uint8, read_frames, read_video_info

H, W = 64, 96


def _smooth_frames(num_frames: int, height: int = H, width: int = W) -> torch.Tensor:
    """Low-frequency noise in [-1, 1], [F, 3, H, W]: coarse random grid upsampled, easy for a lossy codec."""
    coarse = torch.rand(num_frames, 3, 4, 6) * 2 - 1
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _write_failing(path, exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        with StreamingMP4Writer(path, fps=16) as writer:
            writer.write(_smooth_frames(3))
            raise exc


def test_chunks_float_roundtrip(tmp_path):
    out = tmp_path / "video.mp4"
    video = _smooth_frames(12)
    with StreamingMP4Writer(out, fps=16) as writer:
        writer.write(video[:4])  # [F, 3, H, W]
        writer.write(video[4:9].transpose(0, 1)[None])  # VAE layout [1, 3, F, H, W]
        assert not out.exists()  # only the hidden partial file exists while writing
        (partial,) = os.listdir(tmp_path)
        assert partial.startswith(".video.mp4.partial-") and partial.endswith(".mp4")
        writer.write(video[9:])
        assert writer.frames_written == 12
    assert os.listdir(tmp_path) == ["video.mp4"]
    assert read_video_info(out) == (12, W, H, 16.0)
    decoded = read_frames(out)
    assert decoded.shape == (12, H, W, 3) and decoded.dtype == np.uint8
    expected = frames_to_uint8(video).astype(np.float64)
    # Lossy codec + yuv420p chroma subsampling of saturated random colours: measured MAE ~3.2 at crf 18.
    errors = np.abs(decoded[:, None].astype(np.float64) - expected[None]).mean(axis=(2, 3, 4))  # [decoded, source]
    assert np.diagonal(errors).mean() < 6.0, np.diagonal(errors)
    assert (errors.argmin(axis=1) == np.arange(12)).all()  # frames kept their order across chunks
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_uint8_inputs_numpy_and_torch(tmp_path):
    out = tmp_path / "u8.mp4"
    video = frames_to_uint8(_smooth_frames(6))
    with StreamingMP4Writer(out, fps=24, width=W, height=H) as writer:
        writer.write(video[:3])
        writer.write(torch.from_numpy(video[3:]))
    assert read_video_info(out) == (6, W, H, 24.0)
    assert np.abs(read_frames(out).astype(np.float64) - video).mean() < 6.0


def test_mpeg4_fallback_when_libx264_missing(tmp_path, monkeypatch):
    real = video_io._encoder_available
    monkeypatch.setattr(video_io, "_encoder_available", lambda name: name != "libx264" and real(name))
    out = tmp_path / "fallback.mp4"
    video = _smooth_frames(5)
    with StreamingMP4Writer(out, fps=8) as writer:
        assert writer.codec == "mpeg4"
        writer.write(video)
    assert read_video_info(out) == (5, W, H, 8.0)
    assert np.abs(read_frames(out).astype(np.float64) - frames_to_uint8(video)).mean() < 6.0


def test_unknown_codec_raises():
    with pytest.raises(ValueError, match="not-a-codec"):
        StreamingMP4Writer("x.mp4", fps=16, codec="not-a-codec")


def test_exception_in_with_leaves_nothing(tmp_path):
    _write_failing(tmp_path / "video.mp4", RuntimeError("generation failed"))
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    _write_failing(tmp_path / "video.mp4", KeyboardInterrupt())
    assert os.listdir(tmp_path) == []


def test_existing_target_survives_failed_write_and_is_replaced_on_success(tmp_path):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"previous video")
    _write_failing(out, RuntimeError("generation failed"))
    assert os.listdir(tmp_path) == ["video.mp4"]
    assert out.read_bytes() == b"previous video"
    with StreamingMP4Writer(out, fps=16) as writer:
        writer.write(_smooth_frames(2))
    assert os.listdir(tmp_path) == ["video.mp4"]
    assert read_video_info(out)[0] == 2


def test_a_symlink_is_written_through(tmp_path):
    """A symlinked output: the file it points to is replaced (atomically, its folder holds no temp file) and the
    link stays a link."""
    link, target = link_to_existing_file(tmp_path, "store", "video.mp4", "link.mp4")
    with StreamingMP4Writer(link, fps=16) as writer:
        writer.write(_smooth_frames(2))
    assert link.is_symlink() and link.resolve() == target
    assert sorted(os.listdir(tmp_path)) == ["link.mp4", "store"] and os.listdir(target.parent) == ["video.mp4"]
    assert read_video_info(target)[0] == 2


def test_abort(tmp_path):
    out = tmp_path / "video.mp4"
    with StreamingMP4Writer(out, fps=16) as writer:
        writer.write(_smooth_frames(3))
        writer.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="closed or aborted"):
        writer.write(_smooth_frames(1))


def test_close_is_idempotent_and_abort_after_close_keeps_file(tmp_path):
    out = tmp_path / "video.mp4"
    writer = StreamingMP4Writer(out, fps=16)
    writer.write(_smooth_frames(2))
    writer.close()
    writer.close()
    writer.abort()
    assert read_video_info(out)[0] == 2
    with pytest.raises(RuntimeError, match="closed or aborted"):
        writer.write(_smooth_frames(1))


def test_no_frames_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="no frames"):
        with StreamingMP4Writer(tmp_path / "video.mp4", fps=16):
            pass
    assert os.listdir(tmp_path) == []


def test_odd_size_raises(tmp_path):
    with pytest.raises(ValueError, match="33x64"):
        StreamingMP4Writer(tmp_path / "a.mp4", fps=16, width=33, height=64)
    with pytest.raises(ValueError, match="64x33"):
        with StreamingMP4Writer(tmp_path / "b.mp4", fps=16) as writer:
            writer.write(_smooth_frames(2, height=33, width=64))
    assert os.listdir(tmp_path) == []


def test_odd_size_allowed_for_yuv444p(tmp_path):
    out = tmp_path / "odd.mp4"
    with StreamingMP4Writer(out, fps=16, pix_fmt="yuv444p") as writer:
        writer.write(_smooth_frames(2, height=33, width=65))
    assert read_video_info(out) == (2, 65, 33, 16.0)


def test_mismatched_size_raises(tmp_path):
    with pytest.raises(ValueError, match="48x32"):
        with StreamingMP4Writer(tmp_path / "video.mp4", fps=16) as writer:
            writer.write(_smooth_frames(2, height=32, width=32))
            writer.write(_smooth_frames(2, height=32, width=48))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="differs"):
        StreamingMP4Writer(tmp_path / "video.mp4", fps=16, width=W, height=H).write(_smooth_frames(1, 32, 32))
    assert os.listdir(tmp_path) == []


def test_frames_to_uint8_values_and_layouts():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = frames_to_uint8(x)
    assert out.shape == (2, 1, 6, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]
    video = _smooth_frames(5).to(torch.bfloat16)
    np.testing.assert_array_equal(frames_to_uint8(video.transpose(0, 1)[None]), frames_to_uint8(video))
    u8 = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(frames_to_uint8(torch.from_numpy(u8)), u8)


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.zeros(2, 3, 4, 4, 3), ValueError),  # 5-D but not [1, 3, F, H, W]
        (torch.zeros(2, 4, 4, 3), ValueError),  # float channels-last
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ValueError),  # uint8 channels-first
        (torch.zeros(2, 3, 4, 4, dtype=torch.int32), TypeError),
    ],
)
def test_frames_to_uint8_rejects_bad_input(bad, error):
    with pytest.raises(error):
        frames_to_uint8(bad)


def test_fractional_fps(tmp_path):
    out = tmp_path / "ntsc.mp4"
    with StreamingMP4Writer(out, fps=30000 / 1001) as writer:
        assert writer.rate == Fraction(30000, 1001)
        writer.write(_smooth_frames(3))
    num_frames, _, _, fps = read_video_info(out)
    assert num_frames == 3 and fps == pytest.approx(29.97, abs=1e-3)
