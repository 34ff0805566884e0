"""The Wan2.2 VAE decoder's causal 3x3x3 convolutions: cuDNN bf16 against the FP8 implicit-GEMM kernel
(`longstream/quant/kernels/fp8_conv.py`), each shape a residual-block convolution of a 1280x704 chunk decoded 4
latent frames a call (bench/vae_decode.py's setting).

Per shape: milliseconds and TFLOP/s of cuDNN's bf16 convolution (channels-last, the input with its 2 causal frames
in front, without bias: as `FastResidualBlock` runs it, the bias folded into the next norm), of the FP8 kernel
(bias in its epilogue) with per-step float32 promotion (the default) and without it, and of the norm + SiLU in
front of it: the compiled bf16 one (`channel_rms_norm`) against the FP8 norm-quantize kernel that writes the
padded buffer. Errors, relative Frobenius against a float32 convolution (TF32 off) of the bf16 input: "fp8 err"
(all of FP8: the input and weights rounded to E4M3) and "acc err" (the kernel's own summation against the float32
convolution of the E4M3 values, promoted / not). Random weights (scale 1/sqrt(27 C)) and inputs from a random
norm. (Its first run, 2026-12-03, timed cuDNN with its separate bias pass: bench/RESULTS.md.)

    python bench/fp8_conv.py [--shapes all|C,O,T,H,W;...] [--repeat 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longstream import fused
from longstream.paths import check_json_option
from longstream.quant import fp8_conv as formats
from longstream.vae.fast import channel_rms_norm

# (C, O, T, H, W, calls a chunk) of the 5B decoder's residual-block convolutions (bench/vae_decode.py's op list)
DECODER_SHAPES = [
    (1024, 1024, 4, 44, 80, 20),
    (1024, 1024, 8, 88, 160, 12),
    (1024, 512, 16, 176, 320, 2),
    (512, 512, 16, 176, 320, 10),
    (512, 256, 16, 352, 640, 2),
    (256, 256, 16, 352, 640, 10),
]


def timed(fn, repeat: int) -> float:
    """Milliseconds of one call (median of `repeat`, after a warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(c: int, o: int, t: int, h: int, w: int, repeat: int) -> dict:
    from longstream.quant.kernels.fp8_conv import fp8_conv3d_triton, norm_silu_fp8_triton

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(c + o + h)
    x = torch.randn(1, c, t, h, w, device=dev, dtype=torch.bfloat16, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    gamma = (torch.rand(c, 1, 1, 1, device=dev, generator=gen) + 0.5).to(torch.bfloat16)
    weight = (torch.randn(o, c, 3, 3, 3, device=dev, generator=gen) / (27 * c) ** 0.5).to(torch.bfloat16)
    weight = weight.contiguous(memory_format=torch.channels_last_3d)
    bias = torch.randn(o, device=dev, generator=gen).to(torch.bfloat16)
    flops = 2 * 27 * c * o * t * h * w
    row = dict(c=c, o=o, t=t, h=h, w=w, tflop=flops / 1e12)

    norm = torch.compile(channel_rms_norm, dynamic=False)
    row["norm_bf16_ms"] = timed(lambda: norm(x, gamma, 0.0, c ** 0.5, True), repeat)
    y = norm(x, gamma, 0.0, c ** 0.5, True)
    padded = torch.cat([torch.zeros_like(y[:, :, :2]), y], dim=2)
    cudnn = lambda: F.conv3d(padded, weight, None, padding=(0, 1, 1))  # noqa: E731
    row["cudnn_bf16_ms"] = timed(cudnn, repeat)

    x_scale = formats.activation_bound(gamma, 0.0, c ** 0.5) / formats.E4M3_MAX
    x_cl = x.permute(0, 2, 3, 4, 1)
    row["norm_fp8_ms"] = timed(lambda: norm_silu_fp8_triton(x_cl, gamma, 0.0, c ** 0.5, True, x_scale), repeat)
    buffer = norm_silu_fp8_triton(x_cl, gamma, 0.0, c ** 0.5, True, x_scale)
    codes, scales = formats.quantize_weight(weight)
    for promote in (True, False):
        name = "fp8" if promote else "fp8_no_promote"
        row[f"{name}_ms"] = timed(lambda: fp8_conv3d_triton(buffer, codes, scales, x_scale, bias=bias,
                                                            promote=promote), repeat)
        out = fp8_conv3d_triton(buffer, codes, scales, x_scale, bias=bias, out_dtype=torch.float32, promote=promote)
        torch.backends.cudnn.allow_tf32 = False
        if promote:  # float32 references, one at a time (the largest shape's are ~3.6 GB each)
            exact_bf16 = F.conv3d(padded.float(), weight.float(), bias.float(), padding=(0, 1, 1))
            row["fp8_err"] = rel(out.permute(0, 4, 1, 2, 3), exact_bf16)
            row["cudnn_bf16_err"] = rel(cudnn() + bias.view(1, -1, 1, 1, 1), exact_bf16)
            del exact_bf16
        values = formats.e4m3_values(buffer).permute(0, 4, 1, 2, 3)
        w_values = formats.e4m3_values(codes).view(o, 3, 3, 3, c).permute(0, 4, 1, 2, 3) * scales.view(-1, 1, 1, 1, 1)
        exact_codes = F.conv3d(values, w_values) * x_scale + bias.float().view(1, -1, 1, 1, 1)
        row[f"{name}_acc_err"] = rel(out.permute(0, 4, 1, 2, 3), exact_codes)
        del values, w_values, exact_codes, out
        torch.backends.cudnn.allow_tf32 = True
    for name in ("cudnn_bf16", "fp8", "fp8_no_promote"):
        row[f"{name}_tflops"] = flops / row[f"{name}_ms"] / 1e9
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help="'all' (the decoder's) or C,O,T,H,W;C,O,T,H,W;...")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    a = p.parse_args()
    check_json_option(p, a.out, "--out")  # before any work
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (Hopper: TMA and FP8 tensor cores)")
    if a.shapes == "all":
        shapes = DECODER_SHAPES
    else:
        shapes = [(*map(int, s.split(",")), 1) for s in a.shapes.split(";")]
    rows, weighted = [], {"cudnn_bf16": 0.0, "fp8": 0.0, "norm_bf16": 0.0, "norm_fp8": 0.0}
    print(f"{'C':>5} {'O':>5} {'T':>3} {'H':>4} {'W':>4} | {'cuDNN ms':>9} {'TF/s':>5} | {'fp8 ms':>8} {'TF/s':>5} "
          f"{'x cuDNN':>7} | {'no-prom ms':>10} {'TF/s':>5} | {'norm ms':>7} {'fp8 norm':>8} | {'fp8 err':>7} "
          f"{'bf16 err':>8} {'acc err':>8} {'no-prom':>8}")
    with torch.no_grad(), fused.fusion(True):
        for c, o, t, h, w, calls in shapes:
            row = bench_shape(c, o, t, h, w, a.repeat)
            row["calls_a_chunk"] = calls
            rows.append(row)
            for k in weighted:
                weighted[k] += calls * row[f"{k}_ms"]
            print(f"{c:5d} {o:5d} {t:3d} {h:4d} {w:4d} | {row['cudnn_bf16_ms']:9.2f} {row['cudnn_bf16_tflops']:5.0f} | "
                  f"{row['fp8_ms']:8.2f} {row['fp8_tflops']:5.0f} {row['cudnn_bf16_ms'] / row['fp8_ms']:7.2f} | "
                  f"{row['fp8_no_promote_ms']:10.2f} {row['fp8_no_promote_tflops']:5.0f} | "
                  f"{row['norm_bf16_ms']:7.2f} {row['norm_fp8_ms']:8.2f} | {row['fp8_err']:7.4f} "
                  f"{row['cudnn_bf16_err']:8.4f} {row['fp8_acc_err']:8.2e} {row['fp8_no_promote_acc_err']:8.2e}",
                  flush=True)
    bf16_ms, fp8_ms = weighted["cudnn_bf16"] + weighted["norm_bf16"], weighted["fp8"] + weighted["norm_fp8"]
    print(f"a chunk's residual convolutions + norms: cuDNN bf16 {bf16_ms:.0f} ms, FP8 {fp8_ms:.0f} ms")
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  rows=rows, chunk_ms={k: v for k, v in weighted.items()})
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
