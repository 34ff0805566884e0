"""Attention of one chunk over a full KV cache with bf16, FP8 and NVFP4 storage (GPU).

Default shape = the 5B preset at a full window: 7040 queries (8 latent frames x 880 tokens) against 28160 keys
(32 frames), 24 heads of 128. Quantized caches are dequantized into the compute dtype (NVFP4 with the Triton
kernel `quant/kernels/kv_dequant.py`) and then go through the fastest SDPA backend measured for bf16. The row
`nvfp4-fused` instead attends straight from the NVFP4 cache, decoding K and V tiles in registers
(`quant/kernels/kv_attention.py`); the faster of the two NVFP4 paths is the one to keep. The rows `fp8-attn
BMxBNxWARPSxSTAGES` attend from the FP8 cache with both matmuls in FP8 (`quant/kernels/fp8_attention.py`: E4M3
queries and probabilities too), one row per launch setting of `--fp8-configs`.

    python bench/kv_attention.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longstream.model.kv_cache import DenseKVStorage
from longstream.paths import check_json_option
from longstream.quant.kernels.fp8_attention import fp8_attention
from longstream.quant.kernels.kv_attention import nvfp4_kv_attention
from longstream.quant.kv_storage import FP8KVStorage, NVFP4KVStorage

STORAGES = {"bf16": DenseKVStorage, "fp8": FP8KVStorage, "nvfp4": NVFP4KVStorage}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def median_ms(fn, reps: int = 30) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=reps * 10, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=7040)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--tokens-per-frame", type=int, default=880)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--fp8-configs", default="64x128x4x2,128x128x8x2,128x64x8x3,64x128x4x3",
                   help="FP8 attention launch settings, BLOCK_MxBLOCK_NxWARPSxSTAGES, comma list")
    p.add_argument("--out", default="bench/results/kv_attention.json")
    a = p.parse_args()
    check_json_option(p, a.out, "--out")  # before any work
    dev = torch.device("cuda")
    keys = a.frames * a.tokens_per_frame
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, a.heads, a.queries, a.head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, a.heads, keys, a.head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, a.heads, keys, a.head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
    flops = 4 * a.heads * a.queries * keys * a.head_dim

    # fastest SDPA backend on bf16
    backend_ms = {}
    for name, be in BACKENDS.items():
        try:
            with sdpa_kernel(be):
                backend_ms[name] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as exc:
            backend_ms[name] = None
            print(f"backend {name}: unavailable ({str(exc).splitlines()[0][:80]})")
    best = min((n for n in backend_ms if backend_ms[n] is not None), key=lambda n: backend_ms[n])
    with sdpa_kernel(BACKENDS[best]):
        reference = F.scaled_dot_product_attention(q, k, v).float()

    rows, stores = [], {}
    for name, cls in STORAGES.items():
        kwargs = {} if name == "bf16" else {"tokens_per_frame": a.tokens_per_frame}
        store = cls(1, a.heads, keys, a.head_dim, torch.bfloat16, dev, **kwargs)
        store.write(torch.arange(keys, device=dev), k, v)
        stores[name] = store
        torch.cuda.synchronize()

        def step():
            kk, vv = store.read(keys)
            with sdpa_kernel(BACKENDS[best]):
                return F.scaled_dot_product_attention(q, kk, vv)

        out = step().float()
        total = median_ms(step)
        dequant = median_ms(lambda: store.read(keys))
        rel = ((out - reference).norm() / reference.norm()).item()
        rows.append(dict(kv=name, total_ms=total, dequant_ms=dequant, kv_bytes=store.nbytes(),
                         tflops=flops / total / 1e9, rel_err_vs_bf16=rel))

    fp4 = stores["nvfp4"]

    def fused():
        return nvfp4_kv_attention(q, (fp4.k, fp4.k_block, fp4.k_scale), (fp4.v, fp4.v_block, fp4.v_scale), keys,
                                  a.tokens_per_frame)

    out = fused().float()
    total = median_ms(fused)
    rows.append(dict(kv="nvfp4-fused", total_ms=total, dequant_ms=None, kv_bytes=fp4.nbytes(),
                     tflops=flops / total / 1e9, rel_err_vs_bf16=((out - reference).norm() / reference.norm()).item()))

    fp8 = stores["fp8"]
    for config in a.fp8_configs.split(","):
        bm, bn, warps, stages = (int(x) for x in config.split("x"))

        def attend():
            return fp8_attention(q, fp8.k, fp8.k_scale, fp8.v, fp8.v_scale, keys, a.tokens_per_frame, block_m=bm,
                                 block_n=bn, num_warps=warps, num_stages=stages)

        out = attend().float()
        total = median_ms(attend)
        rows.append(dict(kv=f"fp8-attn {config}", total_ms=total, dequant_ms=None, kv_bytes=fp8.nbytes(),
                         tflops=flops / total / 1e9,
                         rel_err_vs_bf16=((out - reference).norm() / reference.norm()).item()))

    base = rows[0]
    for r in rows:
        r["time_vs_bf16"] = r["total_ms"] / base["total_ms"]
        r["memory_vs_bf16"] = base["kv_bytes"] / r["kv_bytes"]
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  shape=dict(queries=a.queries, keys=keys, heads=a.heads, head_dim=a.head_dim),
                  sdpa_backend_ms=backend_ms, sdpa_backend=best, rows=rows)
    print(f"{result['device']}  q={a.queries} k={keys} heads={a.heads}x{a.head_dim}  SDPA backend: {best}")
    print("SDPA bf16 by backend (ms): " + ", ".join(f"{n} {m:.3f}" if m else f"{n} n/a" for n, m in backend_ms.items()))
    print(f"{'kv':22s} {'total ms':>9s} {'dequant ms':>10s} {'TFLOP/s':>8s} {'time/bf16':>9s} {'KV MB':>8s} "
          f"{'mem x':>6s} {'rel err':>8s}")
    for r in rows:
        dequant = "-" if r["dequant_ms"] is None else f"{r['dequant_ms']:.3f}"
        print(f"{r['kv']:22s} {r['total_ms']:9.3f} {dequant:>10s} {r['tflops']:8.1f} {r['time_vs_bf16']:9.3f} "
              f"{r['kv_bytes'] / 2**20:8.1f} {r['memory_vs_bf16']:6.2f} {r['rel_err_vs_bf16']:8.4f}")
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
