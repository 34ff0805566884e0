"""The multi-GPU benchmarks bench/sp_inference.py and bench/sp_training.py, run under torchrun with 2 gloo processes
on the CPU at small sizes: the JSON they write, the bytes counted per K/V exchange format against the
`attention_bytes_sent` formula, and the per-rank loss tokens of the two training layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longstream.config import get_preset
from longstream.parallel import attention_bytes_sent

ROOT = Path(__file__).resolve().parents[1]
# embedded: the smallest preset whose head dimension (48) NVFP4 can pack (tiny's 24 is not a multiple of 16)
INFERENCE = ["--preset", "embedded", "--height", "64", "--width", "64", "--steps", "1", "--chunks", "5",
             "--text-tokens", "8"]


def run(script: str, args: list[str], procs: int | None = 2) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *launcher, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def inference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp_inference")
    single = run("sp_inference.py", [*INFERENCE, "--json", str(out / "sp1.json")], procs=None)
    assert single.returncode == 0, single.stderr
    double = run("sp_inference.py", [*INFERENCE, "--kv-exchange", "bf16,fp8,nvfp4", "--json", str(out / "sp2.json"),
                                     "--compare-to", str(out / "sp1.json")])
    assert double.returncode == 0, double.stderr
    return {"sp1": json.loads((out / "sp1.json").read_text()), "sp2": json.loads((out / "sp2.json").read_text()),
            "stdout": double.stdout}


def test_inference_json_and_table(inference):
    sp1, sp2 = inference["sp1"], inference["sp2"]
    assert sp1["sp"] == 1 and [r["kv_exchange"] for r in sp1["rows"]] == [None]
    assert sp1["rows"][0]["a2a_bytes_per_chunk"] == 0
    assert sp2["sp"] == 2 and [r["kv_exchange"] for r in sp2["rows"]] == ["bf16", "fp8", "nvfp4"]
    for key in ("device", "preset", "height", "width", "tokens_per_frame", "chunk_frames", "window_frames",
                "chunks", "first_measured_chunk", "linear", "kv_cache", "dtype", "frame_splits"):
        assert key in sp2
    for row in sp2["rows"]:
        assert row["dit_fps"] > 0 and row["a2a_ms"] > 0 and row["gather_ms"] > 0
        assert (row["kv_codec_ms"] > 0) == (row["kv_exchange"] != "bf16")
        assert set(row["bytes_per_chunk"]) == {"q", "k", "v", "out"}
        assert row["peak_memory_gib"] == [None, None]  # CPU
        assert row["efficiency"] == pytest.approx(row["dit_fps"] / sp1["rows"][0]["dit_fps"] / 2)
    assert "SP=2" in inference["stdout"] and "nvfp4" in inference["stdout"]


def test_inference_bytes_follow_the_wire_formats(inference):
    sp2 = inference["sp2"]
    cfg = get_preset(sp2["preset"]).transformer
    t, d = sp2["tokens_per_frame"], cfg.attention_head_dim
    seq = [f * t for f in sp2["frame_splits"]]
    heads = [cfg.num_attention_heads // 2] * 2
    passes = cfg.num_layers * (sp2["rows"][0]["steps"] + 1)  # denoising steps + the cache-writing pass
    elem = 4  # float32 compute on a CPU
    rows = {r["kv_exchange"]: r for r in sp2["rows"]}
    for name, fmt in (("bf16", "dense"), ("fp8", "fp8"), ("nvfp4", "nvfp4")):
        want = attention_bytes_sent(seq, heads, d, 0, elem_bytes=elem, kv_format=fmt, tokens_per_frame=t)
        assert rows[name]["bytes_per_chunk"] == {k: v * passes for k, v in want.items()}
    kv = {name: r["kv_bytes_per_chunk"] for name, r in rows.items()}
    assert kv["nvfp4"] < kv["fp8"] < kv["bf16"]
    scales = 4 / t  # one float32 scale per (frame, head)
    assert kv["fp8"] / kv["bf16"] == pytest.approx((d + scales) / (d * elem))
    assert kv["nvfp4"] / kv["bf16"] == pytest.approx((d / 2 + d / 16 + scales) / (d * elem))
    # in bf16 on the GPUs the same formulas give ~0.5x and ~0.28x, plus the scales
    assert (d + scales) / (d * 2) == pytest.approx(0.5, abs=0.01)
    assert (d / 2 + d / 16 + scales) / (d * 2) == pytest.approx(0.28, abs=0.01)


def test_training_layouts(tmp_path):
    path = tmp_path / "train.json"
    done = run("sp_training.py", ["--preset", "tiny", "--frames", "4", "--layout", "balanced,naive", "--gemm",
                                  "bf16,nvfp4", "--steps", "1", "--text-tokens", "8", "--json", str(path)])
    assert done.returncode == 0, done.stderr
    result = json.loads(path.read_text())
    assert result["sp"] == 2 and result["layers"] == get_preset("tiny").transformer.num_layers
    rows = {(r["layout"], r["gemm"]): r for r in result["rows"]}
    assert set(rows) == {("balanced", "bf16"), ("balanced", "nvfp4"), ("naive", "bf16"), ("naive", "nvfp4")}
    tokens = 4 * result["tokens_per_frame"]
    for (layout, _), row in rows.items():
        assert row["skipped"] is None and row["step_s"] > 0 and len(row["step_s_per_rank"]) == 2
        assert row["peak_memory_gib"] == [None, None]
        assert row["rank_tokens"] == [tokens, tokens]
        assert sum(row["rank_loss_tokens"]) == tokens
        if layout == "balanced":
            assert row["rank_loss_tokens"][0] == row["rank_loss_tokens"][1]
        else:
            assert row["rank_loss_tokens"] == [0, tokens]
    # both layouts compute the same single-process loss
    assert rows[("naive", "bf16")]["loss"] == pytest.approx(rows[("balanced", "bf16")]["loss"], rel=1e-5)


@pytest.mark.parametrize("script,args,message", [
    ("sp_inference.py", ["--kv-exchange", "int8"], "unknown --kv-exchange value 'int8'"),
    ("sp_training.py", ["--frames", "3"], "launch with torchrun"),
])
def test_bad_arguments_fail_in_one_line(script, args, message):
    done = run(script, ["--preset", "tiny", *args], procs=None)
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1]
