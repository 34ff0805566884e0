"""bench/video_e2e.py (a whole video through `generate`'s path, timed) as a CPU smoke run: rows, MP4, JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_video_bench_times_whole_videos(tmp_path):
    out = tmp_path / "video.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "video_e2e.py"), "--preset", "tiny", "--seconds", "2",
                           "--warmup-seconds", "1", "--steps", "4,2", "--linear", "bf16", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [(r["steps"], r["linear"]) for r in result["rows"]] == [(4, "bf16"), (2, "bf16")]
    for row in result["rows"]:
        assert row["frames"] == row["mp4_frames"] == 32  # 2 s at the tiny preset's 16 fps
        assert 0 < row["first_frame_s"] < row["video_s"]
        assert abs(row["video_fps"] * row["video_s"] - 32) < 1e-6
        assert row["peak_memory_gib"] is None  # CPU
    assert "x real time" in proc.stdout
