"""Make a PNG strip of frames from an MP4: `python tools/frame_strip.py VIDEO.mp4 OUT.png --frames 8 --rows 1`.

Frames are taken at evenly spaced times (first and last included) and laid out left to right, `rows` rows.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from longstream.pipeline.video_io import read_frames


def frame_strip(video: np.ndarray, count: int, rows: int = 1, gap: int = 2) -> np.ndarray:
    """[H', W', 3] uint8 image of `count` evenly spaced frames of `video` [F, H, W, 3], in `rows` rows."""
    if count < 1 or rows < 1 or count % rows:
        raise ValueError(f"need count >= 1 divisible by rows >= 1, got count {count}, rows {rows}")
    picks = np.linspace(0, len(video) - 1, count).round().astype(int)
    h, w = video.shape[1:3]
    per_row = count // rows
    out = np.full((rows * h + (rows - 1) * gap, per_row * w + (per_row - 1) * gap, 3), 255, dtype=np.uint8)
    for i, f in enumerate(picks):
        r, c = divmod(i, per_row)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = video[f]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("output")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    Image.fromarray(frame_strip(read_frames(args.video), args.frames, args.rows)).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
