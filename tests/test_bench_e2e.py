"""`longstream bench e2e` on CPU: a two-row sweep of the tiny preset, the roofline's counts against the FLOPs the
engine executes, and one clear line for bad input."""

import json

import pytest
import torch
from torch.utils import flop_counter

from longstream.bench.breakdown import consistent
from longstream.bench.report import format_table
from longstream.bench.roofline import PEAK_TFLOPS, ceiling, chunk_cost
from longstream.cli import main
from longstream.config import get_preset
from longstream.model.transformer import CausalWanTransformer
from longstream.pipeline.stream import ShotPlan, StreamingGenerator

TINY = ["bench", "e2e", "--preset", "tiny", "--height", "64", "--width", "64", "--chunks", "5", "--device", "cpu",
        "--fuse-qkv", "off", "--quiet"]
SETTINGS = {"device", "torch", "preset", "height", "width", "tokens_per_frame", "chunk_frames", "window_frames",
            "sink_frames", "chunks", "first_measured_chunk", "text_tokens", "seed", "dtype", "vae", "compile",
            "peak_tflops", "peak_tbps", "rows"}
ROW = {"steps", "linear", "kv_cache", "async_decode", "fusion", "fuse_qkv", "video_fps", "dit_fps", "chunk_s", "dit_chunk_s",
       "first_frame_s", "first_chunk_s", "peak_memory_gib", "latent_rel_error", "breakdown_ms", "roofline"}
BREAKDOWN = {"linears", "attention", "cache_write", "vae", "other", "chunk", "kernels", "unlinked", "shared_ids"}
ROOFLINE = {"flops_per_frame", "linear_flops_per_frame", "attention_flops_per_frame", "bytes_per_frame",
            "compute_bound_fps", "memory_bound_fps", "ceiling_fps", "bound", "dit_fraction"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_sweep_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main([*TINY, "--linear", "bf16,nvfp4", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "lat err" in line)
    assert [line.split()[1] for line in lines[header + 1 : header + 3]] == ["bf16", "nvfp4"]
    assert sum(line.startswith("  4 steps") for line in lines) == 2  # one roofline line per configuration

    result = json.loads(out.read_text())
    assert SETTINGS <= result.keys() and result["first_measured_chunk"] == 3
    bf16, nvfp4 = result["rows"]
    assert (bf16["linear"], nvfp4["linear"]) == ("bf16", "nvfp4")
    for row in (bf16, nvfp4):
        assert ROW <= row.keys() and BREAKDOWN <= row["breakdown_ms"].keys() and ROOFLINE <= row["roofline"].keys()
        assert row["kv_cache"] == "dense" and row["async_decode"] is True and row["peak_memory_gib"] is None
        assert row["video_fps"] > 0 and row["dit_fps"] > 0 and row["first_frame_s"] > 0 and row["first_chunk_s"] > 0
        parts = row["breakdown_ms"]
        assert all(parts[k] > 0 for k in ("linears", "attention", "cache_write", "vae"))
        assert parts["chunk"] == pytest.approx(sum(parts[k] for k in ("linears", "attention", "cache_write", "vae",
                                                                        "other")))
        assert parts["kernels"] is None and parts["unlinked"] is None  # GPU-only figures
    assert bf16["latent_rel_error"] == 0
    assert 0 < nvfp4["latent_rel_error"] < 1


def test_dit_only_sweep_without_a_reference_row(tmp_path, capsys):
    """No row is eager bf16 with a dense cache: the reference stream is generated first."""
    out = tmp_path / "e2e.json"
    assert main([*TINY, "--no-vae", "--linear", "fp8", "--kv-cache", "fp8", "--steps", "2", "--json", str(out)]) == 0
    assert "n/a" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["steps"] == 2 and 0 < row["latent_rel_error"] < 1


def test_fused_qkv_rows_follow_the_unfused_reference(tmp_path):
    """A model per q/k/v setting, the unfused one first (it is the reference); the fused rows' latents equal it up
    to float32 GEMM summation order (bf16) and the fp8 rounding (fp8)."""
    out = tmp_path / "e2e.json"
    assert main([*TINY, "--no-vae", "--linear", "bf16,fp8", "--fuse-qkv", "on,off", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["linear"], r["fuse_qkv"]) for r in rows] == [("bf16", False), ("bf16", True), ("fp8", False),
                                                            ("fp8", True)]
    errors = [r["latent_rel_error"] for r in rows]
    assert errors[0] == 0 and errors[1] < 1e-5 and 0 < errors[2] < 0.1 and errors[3] == pytest.approx(errors[2])


def test_dit_only_rows_leave_video_columns_empty(tmp_path):
    out = tmp_path / "e2e.json"
    assert main([*TINY, "--no-vae", "--kv-cache", "dense,fp8", "--json", str(out)]) == 0
    dense, fp8 = json.loads(out.read_text())["rows"]
    for row in (dense, fp8):
        assert row["async_decode"] is None and row["video_fps"] is None and row["first_frame_s"] is None
        assert row["breakdown_ms"]["vae"] is None and row["dit_fps"] > 0
    assert dense["latent_rel_error"] == 0 and fp8["latent_rel_error"] > 0


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(q, k, v)


def test_roofline_flops_equal_the_flops_the_engine_runs():
    preset = get_preset("tiny")
    model = CausalWanTransformer(preset.transformer).eval()
    gen = StreamingGenerator(model, preset.stream, preset.latent_size(64, 64))
    text_tokens = 7
    chunks = gen.generate([ShotPlan(torch.randn(1, text_tokens, preset.transformer.text_dim), 5)],
                          generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # chunk 3 is the first whose attention sees the whole window of 8 frames
        next(chunks)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}  # not counted on CPU
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        next(chunks)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear = sum(counts.get(op, 0) for op in ("aten.addmm", "aten.mm", "aten.convolution"))

    cost = chunk_cost(preset.transformer, preset.stream, preset.tokens_per_frame(64, 64), text_tokens=text_tokens,
                      temporal=4, element_bytes=4)
    assert cost.linear_flops == linear
    assert cost.attention_flops == counter.get_total_flops() - linear
    # by hand: 4 * passes (4 steps + 1) * layers 4 * queries (2 frames x 16 tokens) * dim 96 * keys (8 x 16 + 7)
    assert cost.attention_flops == 4 * 5 * 4 * 32 * 96 * 135 == 33_177_600
    assert cost.video_frames == 8


def test_roofline_ceiling_and_formats():
    preset = get_preset("wan2.2-ti2v-5b")
    costs = {m: chunk_cost(preset.transformer, preset.stream, 880, text_tokens=512, temporal=4, linear=m,
                           kv_cache=kv) for m, kv in (("bf16", "dense"), ("fp8", "fp8"), ("nvfp4", "nvfp4"))}
    assert costs["bf16"].flops == costs["nvfp4"].flops
    assert costs["bf16"].bytes > costs["fp8"].bytes > costs["nvfp4"].bytes
    c = costs["fp8"]
    bound = ceiling(c, "fp8", PEAK_TFLOPS, 3.0)
    compute = c.linear_flops / 1300e12 + c.attention_flops / 780e12
    assert bound.compute_s == pytest.approx(compute) and bound.memory_s == pytest.approx(c.bytes / 3e12)
    assert bound.fps == pytest.approx(32 / max(compute, c.bytes / 3e12)) and bound.bound == "compute"


@pytest.mark.parametrize("args, message", [
    (["--linear", "bf16,int8"], "unknown --linear value 'int8'"),
    (["--kv-cache", "fp16"], "unknown --kv-cache value 'fp16'"),
    (["--async-decode", "maybe"], "unknown --async-decode value 'maybe'"),
    (["--steps", "4,0"], "--steps takes positive integers"),
    (["--chunks", "4"], "--chunks 4 is too few"),
    (["--kv-cache", "nvfp4"], "head dimension divisible by 16"),
    (["--compile", "fastest"], "unknown --compile mode"),
    (["--peak-tflops", "bf16=fast"], "--peak-tflops takes FORMAT=TFLOPS"),
    (["--json", "/no/such/folder/e2e.json"], "does not exist"),
    (["--fusion", "maybe"], "unknown --fusion value 'maybe'"),
    (["--fuse-qkv", "yes"], "unknown --fuse-qkv value 'yes'"),
    (["--decode-device", "cpu", "--no-vae"], "--decode-device needs the VAE"),
    (["--decode-device", "cuda:5"], "cuda:5 asked for"),
    (["--vae-dtype", "fp8"], "--vae-dtype fp8 needs the VAE on a Hopper"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert main([*TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longstream: error: ") and message in err and "\n" not in err


def test_inconsistent_gpu_breakdowns_are_flagged():
    """The H200 run of 2026-12-02 tied more kernel time to CPU events than all kernels took: the table says so."""
    from pathlib import Path

    result = json.loads((Path(__file__).parents[1] / "bench/results/e2e_h200_2026-12-02.json").read_text())
    table = format_table(result)
    assert table.count("breakdown is inconsistent") == len(result["rows"]) == 4
    fine = dict(result["rows"][0], breakdown_ms=dict(result["rows"][0]["breakdown_ms"], unlinked=12.0))
    assert consistent(fine["breakdown_ms"]) and not consistent(result["rows"][0]["breakdown_ms"])
    assert "inconsistent" not in format_table(dict(result, rows=[fine]))
