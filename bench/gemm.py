"""GEMM throughput at LongLive-2.0-5B's linear shapes: bf16 cuBLAS vs FP8 rowwise vs NVFP4 emulated (Triton).

    python bench/gemm.py [--out bench/results/gemm.json] [--tune] [--shapes 7040x3072x3072,...]

For each (M tokens, N, K): random (not zero) inputs, correctness checks first (errors vs float32 references,
NVFP4 quantize bit-exact vs the reference codec), then the median time of many runs (``triton.testing.do_bench``,
L2 flushed between runs) as TFLOP/s = 2*M*N*K / time:

* bf16     ``torch.matmul(x, w.t())`` (cuBLAS)
* fp8      ``torch._scaled_mm`` rowwise (E4M3, fp32 accumulation), operands pre-quantized; ``fp8+q`` adds the
           per-token activation quantization (eager PyTorch ops), ``fp8+qk`` the fused Triton rowwise quantize;
           ``fp8 fast`` is ``use_fast_accum=True``
* nvfp4    the fused Triton W4A4 GEMM (``impl="fused"``: decoded inside the GEMM), operands pre-quantized;
           ``nvfp4+q`` adds the fused activation quantize (amax + quantize kernels)
* split    decode both NVFP4 operands to bf16, then cuBLAS (``impl="split"``); ``split+q`` adds the quantize
* rs       the register-operand W4A4 GEMM (``quant/kernels/nvfp4_gemm_rs.py``: activations decoded to fp16 first,
           weights decoded as wgmma's register operand), its activation decode included; ``rs+q`` adds the quantize
* dec      both operands decoded exactly to fp16, then a Triton fp16 GEMM with the global scales in its epilogue
           (``impl="decoded"``: exact like nvfp4, unlike split), both decodes included; ``dec+q`` adds the quantize;
           ``dec+qd`` is what ``QuantLinear`` runs (``backend.nvfp4_linear``): the activation quantized straight to
           its fp16 decode in one pass, the weight decoded, the GEMM; ``gemm16`` the fp16 GEMM alone on decoded
           operands (the ceiling of any decode-first path). These run the GEMM's default on Hopper, the persistent
           TMA kernel; ``dec ptr`` and ``gemm16 ptr`` its pointer-load kernel (``kernel="pointer"``)

``--tune`` also times every fused-GEMM config (and the plain-Triton decode) at each shape.
Prints a table and writes JSON (``--out``; on the device machine use ``$OUT/gemm.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longstream.paths import check_json_option  # noqa: E402 (after the path insert)

SHAPES: List[Tuple[int, int, int]] = [(m, n, k) for m in (7040, 14080)
                                      for (n, k) in ((3072, 3072), (14336, 3072), (3072, 14336))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def run_shape(m: int, n: int, k: int, tune: bool) -> Dict[str, object]:
    from longstream.quant import backend as qb
    from longstream.quant import fp8
    from longstream.quant import nvfp4 as nv
    from longstream.quant.kernels import nvfp4_gemm as kg
    from longstream.quant.kernels.nvfp4_gemm_rs import nvfp4_matmul_rs
    from longstream.quant.kernels.nvfp4_gemm_decoded import (_scaled_gemm_autotuned, _scaled_gemm_tma_autotuned,
                                                             nvfp4_linear_decoded, nvfp4_matmul_decoded,
                                                             scaled_matmul)
    from longstream.quant.kernels.fp8_quant import fp8_quantize_rowwise_triton
    from longstream.quant.kernels.nvfp4_quant import nvfp4_quantize_triton

    torch.manual_seed(m * 7 + n * 3 + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    flops = 2.0 * m * n * k
    row: Dict[str, object] = {"M": m, "N": n, "K": k}
    err: Dict[str, float] = {}

    # ---- correctness first
    ref32 = x.float() @ w.float().t()
    err["bf16"] = rel(torch.matmul(x, w.t()), ref32)
    xq, xs = fp8.quantize_rowwise(x)
    wq, ws = fp8.quantize_rowwise(w)
    sb = ws.float().reshape(1, -1)
    fp8_ref = fp8.fp8_matmul_reference(xq, xs, wq, ws, out_dtype=torch.float32)
    err["fp8"] = rel(torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16), fp8_ref)
    del fp8_ref

    a = nvfp4_quantize_triton(x)
    b = nvfp4_quantize_triton(w)
    ra, rb = nv.quantize(x), nv.quantize(w)
    row["quantize_bit_exact"] = bool(
        torch.equal(a.data, ra.data) and torch.equal(a.scale.view(torch.uint8), ra.scale.view(torch.uint8))
        and torch.equal(a.global_scale.view(torch.int32), ra.global_scale.view(torch.int32))
        and torch.equal(b.data, rb.data) and torch.equal(b.scale.view(torch.uint8), rb.scale.view(torch.uint8)))
    del ra, rb
    nv_ref = qb.nvfp4_matmul(a, b, out_dtype=torch.float32, backend="reference")
    err["nvfp4_fp32out"] = rel(kg.nvfp4_matmul_triton(a, b, out_dtype=torch.float32), nv_ref)
    err["nvfp4_bf16out"] = rel(kg.nvfp4_matmul_triton(a, b), nv_ref)
    err["split_bf16out"] = rel(kg.nvfp4_matmul_split(a, b), nv_ref)
    err["rs_fp32out"] = rel(nvfp4_matmul_rs(a, b, out_dtype=torch.float32), nv_ref)
    err["dec_fp32out"] = rel(nvfp4_matmul_decoded(a, b, out_dtype=torch.float32), nv_ref)
    err["linear_fp32out"] = rel(nvfp4_linear_decoded(x, b, out_dtype=torch.float32), nv_ref)
    err["dec_ptr_fp32out"] = rel(nvfp4_matmul_decoded(a, b, out_dtype=torch.float32, kernel="pointer"), nv_ref)
    ad16, bd16 = kg.nvfp4_dequantize_triton(a, dtype=torch.float16), kg.nvfp4_dequantize_triton(b, dtype=torch.float16)
    err["nvfp4_vs_bf16_exact"] = rel(nv_ref, ref32)  # the format's own quantization error, for scale
    del nv_ref, ref32
    row["rel_err"] = err
    torch.cuda.synchronize()

    # ---- timing
    def fp8_q() -> torch.Tensor:
        q, s = fp8._quantize_with_amax(x, x.abs().amax(dim=-1, keepdim=True))
        return torch._scaled_mm(q, wq.t(), scale_a=s, scale_b=sb, out_dtype=torch.bfloat16)

    def fp8_qk() -> torch.Tensor:  # activation quantize by the fused Triton kernel
        q, s = fp8_quantize_rowwise_triton(x)
        return torch._scaled_mm(q, wq.t(), scale_a=s, scale_b=sb, out_dtype=torch.bfloat16)

    fns: Dict[str, Callable[[], object]] = {
        "bf16": lambda: torch.matmul(x, w.t()),
        "fp8": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16),
        "fp8+q": fp8_q,
        "fp8+qk": fp8_qk,
        "fp8 fast": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16,
                                             use_fast_accum=True),
        "nvfp4": lambda: kg.nvfp4_matmul_triton(a, b),
        "nvfp4+q": lambda: kg.nvfp4_matmul_triton(nvfp4_quantize_triton(x, check_finite=False), b),
        "split": lambda: kg.nvfp4_matmul_split(a, b),
        "split+q": lambda: kg.nvfp4_matmul_split(nvfp4_quantize_triton(x, check_finite=False), b),
        "rs": lambda: nvfp4_matmul_rs(a, b),
        "rs+q": lambda: nvfp4_matmul_rs(nvfp4_quantize_triton(x, check_finite=False), b),
        "dec": lambda: nvfp4_matmul_decoded(a, b),
        "dec+q": lambda: nvfp4_matmul_decoded(nvfp4_quantize_triton(x, check_finite=False), b),
        "dec+qd": lambda: nvfp4_linear_decoded(x, b),
        "gemm16": lambda: scaled_matmul(ad16, bd16, a.global_scale, b.global_scale),
        "dec ptr": lambda: nvfp4_matmul_decoded(a, b, kernel="pointer"),
        "gemm16 ptr": lambda: scaled_matmul(ad16, bd16, a.global_scale, b.global_scale, kernel="pointer"),
        "quantize": lambda: nvfp4_quantize_triton(x, check_finite=False),
    }
    ms = {name: bench_ms(fn) for name, fn in fns.items()}
    row["ms"] = ms
    row["tflops"] = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items() if name != "quantize"}
    # quantize moves: read x (bf16) twice (amax + quantize), write codes + scales
    row["quantize_GBps"] = (2 * m * k * 2 + m * k // 2 + m * k // 16) / (ms["quantize"] * 1e-3) / 1e9
    best = getattr(kg._nvfp4_gemm_autotuned, "best_config", None)
    row["autotuned_config"] = str(best) if best is not None else None
    for key, tuned in (("dec_ptr_autotuned_config", _scaled_gemm_autotuned),
                       ("dec_tma_autotuned_config", _scaled_gemm_tma_autotuned)):
        best = getattr(tuned, "best_config", None)
        row[key] = str(best) if best is not None else None

    if tune:
        sweep = {}
        for bm, bn, bk, st, nw in kg._CONFIGS:
            for asm in (True, False):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st, num_warps=nw)
                name = f"{bm}x{bn}x{bk}_s{st}_w{nw}{'' if asm else '_plain'}"
                if not asm and (bm, bn, bk, st) != (128, 128, 64, 3):
                    continue  # the plain-Triton decode once, for comparison
                try:
                    t = bench_ms(lambda: kg.nvfp4_matmul_triton(a, b, config=cfg, decode_asm=asm))
                    sweep[name] = round(flops / (t * 1e-3) / 1e12, 1)
                except Exception as e:  # a config that does not compile or fit
                    sweep[name] = f"failed: {type(e).__name__}"
        row["tune_tflops"] = sweep
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/gemm.json")
    p.add_argument("--tune", action="store_true", help="also sweep the fused GEMM's configs")
    p.add_argument("--shapes", default="", help="comma list of MxNxK (default: the 5B model's six)")
    args = p.parse_args()
    check_json_option(p, args.out, "--out")  # before any work
    if not torch.cuda.is_available():
        sys.exit("bench/gemm.py needs a CUDA GPU")
    import triton

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    meta = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    rows = []
    for (m, n, k) in shapes:
        t0 = time.time()
        r = run_shape(m, n, k, args.tune)
        r["wall_s"] = round(time.time() - t0, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()

    cols = ["bf16", "fp8", "fp8+q", "fp8+qk", "fp8 fast", "nvfp4", "nvfp4+q", "split", "split+q", "rs", "rs+q",
            "dec", "dec+q", "dec+qd", "gemm16", "dec ptr", "gemm16 ptr"]
    print("\nTFLOP/s (median), " + meta["device"])
    print("| M x N x K | " + " | ".join(cols)
          + " | fp8/bf16 | fp8+qk/bf16 | nvfp4/bf16 | nvfp4+q/bf16 | rs/bf16 | rs+q/bf16 | dec/bf16 | dec+q/bf16"
          + " | dec+qd/bf16 | gemm16/bf16 | dec ptr/bf16 | gemm16 ptr/bf16 | quantize GB/s |")
    print("|" + "---|" * (len(cols) + 14))
    for r in rows:
        t = r["tflops"]
        print(f"| {r['M']}x{r['N']}x{r['K']} | " + " | ".join(f"{t[c]:.0f}" for c in cols)
              + f" | {t['fp8'] / t['bf16']:.2f} | {t['fp8+qk'] / t['bf16']:.2f} | {t['nvfp4'] / t['bf16']:.2f}"
              + f" | {t['nvfp4+q'] / t['bf16']:.2f} | {t['rs'] / t['bf16']:.2f} | {t['rs+q'] / t['bf16']:.2f}"
              + f" | {t['dec'] / t['bf16']:.2f} | {t['dec+q'] / t['bf16']:.2f}"
              + f" | {t['dec+qd'] / t['bf16']:.2f} | {t['gemm16'] / t['bf16']:.2f}"
              + f" | {t['dec ptr'] / t['bf16']:.2f} | {t['gemm16 ptr'] / t['bf16']:.2f}"
              + f" | {r['quantize_GBps']:.0f} |")
    print("\nrel. errors: " + "; ".join(
        f"{r['M']}x{r['N']}x{r['K']}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err"].items())
        + f", quantize bit-exact {r['quantize_bit_exact']}" for r in rows))
    if any("tune_tflops" in r for r in rows):
        print("\nfused GEMM configs (TFLOP/s):")
        for r in rows:
            print(f"  {r['M']}x{r['N']}x{r['K']}: {r.get('tune_tflops')}  autotuned: {r['autotuned_config']}")
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
