"""Sequence-parallel layout and traffic, computed (not timed), on CPU.

Training (AR teacher forcing, sequence [clean frames, noisy frames]): per-rank loss-bearing tokens, attention
FLOPs of the rank's queries (what a query-sharded attention would compute; under Ulysses the attention itself is
head-sharded and every rank computes total/P whatever the layout) and clean latent frames the rank needs (its VAE
encoding share), for the naive contiguous split and Balanced SP.

Inference (one chunk): bytes one rank sends through the Ulysses all-to-alls (q, k, v, out; every layer of every
pass) with K/V in bf16, FP8 or NVFP4 (per frame-and-head float32 scales included).

Default shape = the 5B preset: 880 tokens per latent frame, 24 heads of 128, 30 layers, chunks of 8 latent
frames, 5 passes per chunk (4 denoising steps + the cache-writing pass).

    python bench/sp_layout.py [--out sp_layout.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longstream.model.attention import teacher_forcing_mask
from longstream.parallel.balanced_sp import make_layout
from longstream.parallel.ulysses import attention_bytes_sent, even_splits
from longstream.paths import check_json_option


def training_rows(frames: int, chunk: int, world: int, tokens: int, heads: int, head_dim: int,
                  layers: int) -> list[dict]:
    total_pairs = int(teacher_forcing_mask(frames, chunk).sum()) * tokens * tokens
    flops_per_pair = 4 * heads * head_dim * layers  # QK^T and PV, forward
    rows = []
    for kind in ("naive", "balanced"):
        counts = make_layout(kind, frames, chunk, world).counts(tokens)
        loss = [c.loss_tokens for c in counts]
        flops = [c.query_pairs * flops_per_pair for c in counts]
        rows.append({
            "frames": frames, "sp": world, "layout": kind,
            "loss_tokens": loss,
            "loss_max_over_min": max(loss) / min(loss) if min(loss) else None,
            "query_attn_tflop": [f / 1e12 for f in flops],
            "query_attn_max_over_min": max(flops) / min(flops),
            "ulysses_attn_tflop_per_rank": total_pairs * flops_per_pair / world / 1e12,
            "latent_frames_per_rank_max": max(c.latent_frames for c in counts),
        })
    return rows


def inference_rows(chunk: int, world: int, tokens: int, heads: int, head_dim: int, layers: int,
                   passes: int) -> list[dict]:
    seq = [f * tokens for f in even_splits(chunk, world)]
    hs = even_splits(heads, world)
    rows = []
    for fmt in ("bf16", "fp8", "nvfp4"):
        per_call = [attention_bytes_sent(seq, hs, head_dim, r, elem_bytes=2,
                                         kv_format="dense" if fmt == "bf16" else fmt, tokens_per_frame=tokens)
                    for r in range(world)]
        worst = max(per_call, key=lambda b: sum(b.values()))
        scale = layers * passes
        rows.append({
            "sp": world, "kv": fmt, "tokens_per_rank": max(seq),
            "q_mb": worst["q"] * scale / 1e6, "kv_mb": (worst["k"] + worst["v"]) * scale / 1e6,
            "out_mb": worst["out"] * scale / 1e6, "total_mb": sum(worst.values()) * scale / 1e6,
        })
    base = rows[0]["total_mb"]
    for row in rows:
        row["vs_bf16"] = row["total_mb"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, nargs="+", default=[128, 256], help="latent frames per training clip")
    p.add_argument("--sp", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens-per-frame", type=int, default=880)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--out", default=None, help="write the tables as JSON here")
    a = p.parse_args()
    check_json_option(p, a.out, "--out")  # before any work

    train = [row for f in a.clips for w in a.sp
             for row in training_rows(f, a.chunk, w, a.tokens_per_frame, a.heads, a.head_dim, a.layers)]
    infer = [row for w in a.sp
             for row in inference_rows(a.chunk, w, a.tokens_per_frame, a.heads, a.head_dim, a.layers, a.passes)]

    print(f"Training, teacher forcing: {a.tokens_per_frame} tokens/frame, {a.heads}x{a.head_dim} heads, "
          f"{a.layers} layers, chunk {a.chunk}; per rank (min..max), forward attention")
    print("| frames | SP | layout | loss tokens | max/min | query-attn TFLOP | max/min | Ulysses attn TFLOP | "
          "latents to encode |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in train:
        lm = "inf" if r["loss_max_over_min"] is None else f"{r['loss_max_over_min']:.2f}"
        print(f"| {r['frames']} | {r['sp']} | {r['layout']} | {min(r['loss_tokens'])}..{max(r['loss_tokens'])} | "
              f"{lm} | {min(r['query_attn_tflop']):.1f}..{max(r['query_attn_tflop']):.1f} | "
              f"{r['query_attn_max_over_min']:.2f} | {r['ulysses_attn_tflop_per_rank']:.1f} | "
              f"{r['latent_frames_per_rank_max']} |")
    print()
    print(f"Inference, one chunk of {a.chunk} frames: all-to-all MB sent by one rank, {a.layers} layers x "
          f"{a.passes} passes")
    print("| SP | K/V | tokens/rank | q | k+v | out | total | vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in infer:
        print(f"| {r['sp']} | {r['kv']} | {r['tokens_per_rank']} | {r['q_mb']:.0f} | {r['kv_mb']:.0f} | "
              f"{r['out_mb']:.0f} | {r['total_mb']:.0f} | {r['vs_bf16']:.2f} |")
    if a.out:
        config = {k: v for k, v in vars(a).items() if k != "out"}
        Path(a.out).write_text(json.dumps({"config": config, "training": train, "inference": infer}, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
