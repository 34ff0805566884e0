"""Streaming MP4 output with atomic finalization, plus small decode helpers for tests and evaluation.

`StreamingMP4Writer` encodes frames as soon as they are handed to `write()` (only the encoder's own lookahead is
held in memory), into a hidden temporary file next to the target. A successful `close()` flushes the encoder,
fsyncs the file and `os.replace()`s it onto the target path (for a symlink, onto the file it points to: the link
stays), so a reader never sees a half-written video under the final name. Any exception inside the `with` block
(KeyboardInterrupt included) or an explicit `abort()` deletes the temporary file and leaves whatever already
existed at the target path untouched.

Odd frame sizes are rejected (ValueError naming the size) for chroma-subsampled pixel formats such as yuv420p,
rather than padded: padding would silently change the video's dimensions.
"""

from __future__ import annotations

import os
import secrets
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from ..paths import final_path

_FALLBACK_CODEC = "mpeg4"


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert frames to a C-contiguous uint8 numpy array [F, H, W, 3] (RGB).

    Accepted inputs:
      * floating point [F, 3, H, W] or [1, 3, F, H, W] (the VAE's output layout) with values in [-1, 1]:
        clamped to [-1, 1], mapped to [0, 255] by (x + 1) * 127.5 and rounded to nearest (half to even);
        the conversion runs on the tensor's device, so only uint8 data is copied to the host;
      * uint8 [F, H, W, 3]: returned unchanged (as numpy).
    """
    t = torch.as_tensor(frames).detach()
    if t.dtype == torch.uint8:
        if t.dim() != 4 or t.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [F, H, W, 3], got shape {tuple(t.shape)}")
        return np.ascontiguousarray(t.cpu().numpy())
    if not t.is_floating_point():
        raise TypeError(f"frames must be floating point in [-1, 1] or uint8, got {t.dtype}")
    if t.dim() == 5:
        if t.shape[0] != 1 or t.shape[1] != 3:
            raise ValueError(f"5-D float frames must be [1, 3, F, H, W], got shape {tuple(t.shape)}")
        t = t[0].transpose(0, 1)  # [F, 3, H, W]
    elif t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"float frames must be [F, 3, H, W] or [1, 3, F, H, W], got shape {tuple(t.shape)}")
    u8 = ((t.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _encoder_available(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


def _as_rate(fps: float | Fraction) -> Fraction:
    rate = Fraction(fps) if isinstance(fps, (int, Fraction)) else Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


class StreamingMP4Writer:
    """Write an MP4 incrementally and publish it atomically; use as a context manager.

    Args:
        path: final output path; its directory must exist.
        fps: frame rate (floats are turned into a fraction with denominator <= 1001, e.g. 29.97 -> 2997/100).
        width, height: frame size; taken from the first frames written when not given.
        codec: encoder name; "libx264" falls back to "mpeg4" when the bundled FFmpeg lacks it (see `.codec`).
        crf: quality, lower is better. libx264 uses it as its CRF (0-51); the mpeg4 encoder uses a constant
            quantizer qscale = clamp(round(crf / 6), 2, 31), so the default 18 gives qscale 3.
        preset: libx264's speed preset. "veryfast" encodes 1280x704 noise-like frames at ~47 frames/s on an H200
            host's 16 cores against ~19 for x264's own default "medium" (bench/RESULTS.md), so encoding keeps up
            with generation; slower presets make smaller files at the same CRF.
        pix_fmt: encoded pixel format; chroma-subsampled ones (yuv420p) need even sizes.
        codec_options: extra FFmpeg encoder options, applied last (e.g. {"tune": "film"}).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | Fraction,
        width: int | None = None,
        height: int | None = None,
        codec: str = "libx264",
        crf: int = 18,
        preset: str = "veryfast",
        pix_fmt: str = "yuv420p",
        codec_options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._target = final_path(self.path)  # the file replaced: a symlink's, not the link
        self.rate = _as_rate(fps)
        if codec == "libx264" and not _encoder_available(codec):
            codec = _FALLBACK_CODEC
        elif not _encoder_available(codec):
            raise ValueError(f"encoder {codec!r} is not available in PyAV's FFmpeg")
        self.codec = codec
        self.pix_fmt = pix_fmt
        self._format = av.VideoFormat(pix_fmt)
        if codec == "mpeg4":
            options = {"flags": "+qscale", "global_quality": str(min(max(round(crf / 6), 2), 31) * 118)}
        else:
            options = {"crf": str(crf), "preset": preset}
        self._options = {**options, **(codec_options or {})}
        self.width: int | None = None
        self.height: int | None = None
        if (width is None) != (height is None):
            raise ValueError("give both width and height, or neither")
        if width is not None and height is not None:
            self._set_size(width, height)
        self.frames_written = 0
        self._tmp_path: Path | None = None
        self._fd: int | None = None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._finished = False

    def _set_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        # Luma samples per chroma sample along each axis (2 for yuv420p, 1 for yuv444p and RGB).
        step_w = 64 // self._format.chroma_width(64)
        step_h = 64 // self._format.chroma_height(64)
        if width % step_w or height % step_h:
            raise ValueError(
                f"frame size {width}x{height} (WxH) is not supported by pix_fmt {self.pix_fmt!r}: width must be a "
                f"multiple of {step_w} and height of {step_h}; resize or crop the frames (or use pix_fmt='yuv444p')"
            )
        self.width, self.height = width, height

    def _open(self) -> None:
        name = f".{self._target.name}.partial-{secrets.token_hex(8)}.mp4"
        tmp_path = self._target.with_name(name)
        # O_EXCL reserves the name; mode 0o666 lets the umask decide the final permissions, as for a plain open().
        self._fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._tmp_path = tmp_path
        self._container = av.open(str(tmp_path), mode="w", format="mp4")
        stream = self._container.add_stream(self.codec, rate=self.rate, options=self._options)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, self.pix_fmt
        stream.codec_context.time_base = 1 / self.rate
        self._stream = stream

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Convert (see `frames_to_uint8`) and encode a chunk of frames now."""
        if self._finished:
            raise RuntimeError(f"writer for {self.path} is already closed or aborted")
        arr = frames_to_uint8(frames)
        _, h, w, _ = arr.shape
        if self.width is None:
            self._set_size(w, h)
        elif (w, h) != (self.width, self.height):
            raise ValueError(f"frame size {w}x{h} (WxH) differs from the video's {self.width}x{self.height}")
        if arr.shape[0] == 0:
            return
        if self._container is None:
            self._open()
        for frame_rgb in arr:
            frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder, fsync and move the file to `path`; on failure abort and re-raise. No-op if finished."""
        if self._finished:
            return
        try:
            if self._container is None:
                raise RuntimeError(f"no frames were written to {self.path}; refusing to create an empty video")
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp_path, self._target)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        if os.name == "posix":  # make the rename itself durable
            dir_fd = os.open(self._target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def abort(self) -> None:
        """Discard everything written: delete the temporary file; `path` is left as it was. No-op if finished."""
        if self._finished:
            return
        self._finished = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # the file is deleted below, so a failing trailer write does not matter
                pass
            self._container = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> StreamingMP4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_video_info(path: str | os.PathLike[str]) -> tuple[int, int, int, float]:
    """(num_frames, width, height, fps) of the first video stream; frames are counted by decoding them all.

    fps is the stream's average rate (0.0 if the file does not record one).
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        num_frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate
        return num_frames, stream.codec_context.width, stream.codec_context.height, float(rate or 0)


def read_frames(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of the first video stream to uint8 RGB [F, H, W, 3]."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            return np.empty((0, stream.codec_context.height, stream.codec_context.width, 3), dtype=np.uint8)
        return np.stack(frames)
