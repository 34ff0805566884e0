"""`longstream` command line: generate | train | world | eval | lora | convert | bench | info."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from typing import Sequence

from .config import PRESETS
from .errors import LongstreamError, UsageError
from .paths import output_file


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video, streaming it to an MP4 file",
        description="Generate a video chunk by chunk and write it to an MP4 as frames are produced. "
        "Several --prompt values (or a --prompts file) make a multi-shot video whose prompt switches live.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt; repeat for several shots sharing --seconds evenly")
    src.add_argument("--prompts", metavar="FILE",
                     help="shot list: YAML or JSONL of {prompt, seconds} entries")
    p.add_argument("--seconds", type=float, help="video length with --prompt (default 4)")
    p.add_argument("--output", "-o", default="out.mp4", help="output MP4 (written atomically; default out.mp4)")
    p.add_argument("--preset", default="embedded", choices=sorted(PRESETS),
                   help="model preset (default embedded: the small model shipped with longstream)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="transformer weights: a longstream file (see `longstream convert`), a diffusers folder, "
                   "original Wan safetensors or a LongLive .pt")
    p.add_argument("--lora", metavar="FILE", help="LoRA adapter to apply (e.g. the 4->2 step LoRA)")
    p.add_argument("--text-encoder", metavar="DIR",
                   help="umT5 folder (text_encoder/ + tokenizer/) for Wan checkpoints; default: the --checkpoint "
                   "folder when it is a diffusers pipeline, else the built-in hash encoder")
    p.add_argument("--offload-text-encoder", action="store_true", help="keep umT5 in CPU memory between prompts")
    p.add_argument("--text-cache", metavar="DIR", help="cache umT5 prompt embeddings in this folder")
    p.add_argument("--vae", metavar="PATH", help="VAE: a diffusers vae/ or pipeline folder, or a longstream VAE "
                   "file; default: the pipeline folder's, the shipped one (embedded preset) or random weights")
    p.add_argument("--vae-dtype", choices=("bf16", "fp8", "fp32"),
                   help="VAE decode precision (default: bf16 on CUDA, with channels-last convolutions; fp32 "
                   "elsewhere); fp8: bf16 with the residual blocks' convolutions in FP8 (Hopper GPUs)")
    p.add_argument("--steps", type=int, choices=(4, 2), help="sampling steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, help="video height (default: the preset's)")
    p.add_argument("--width", type=int, help="video width (default: the preset's)")
    p.add_argument("--linear", default="bf16", choices=("bf16", "fp8", "nvfp4"),
                   help="linear layers: bf16 (unquantized, default), fp8 (W8A8) or nvfp4 (W4A4)")
    p.add_argument("--kv-cache", default="dense", choices=("dense", "fp8", "nvfp4"),
                   help="KV-cache storage: dense (compute dtype, default), fp8 or nvfp4")
    p.add_argument("--attention", default="bf16", choices=("bf16", "fp8"),
                   help="self-attention matmuls: bf16 (default) or fp8 (reads an fp8 KV cache: --kv-cache fp8)")
    p.add_argument("--async-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the VAE on a worker overlapping the DiT (default: on with a GPU)")
    p.add_argument("--decode-device", metavar="DEVICE",
                   help="decode the VAE on this device, e.g. cuda:1 (default: the generating device)")
    p.add_argument("--sp", type=int, default=1, metavar="N",
                   help="sequence-parallel ranks (launch with torchrun --nproc-per-node N; rank 0 writes the video)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from .pipeline.generate import GenerateRequest, generate_video

    if args.vae and not os.path.exists(args.vae):  # else the folder reading (diffusers) would say "no config.json"
        raise UsageError(f"--vae {args.vae}: no such file or folder")
    request = GenerateRequest(
        output=args.output, preset=args.preset, prompts=args.prompt, prompts_file=args.prompts,
        seconds=args.seconds, steps=args.steps, seed=args.seed, checkpoint=args.checkpoint,
        height=args.height, width=args.width, device=args.device, progress=not args.quiet,
        kv_cache=args.kv_cache, attention=args.attention, linear=args.linear, async_decode=args.async_decode,
        decode_device=args.decode_device,
        lora=args.lora, sp=args.sp,
        text_encoder=args.text_encoder, vae=args.vae, offload_text_encoder=args.offload_text_encoder,
        text_cache=args.text_cache, vae_dtype=args.vae_dtype,
    )
    generate_video(request)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train or tune a model from a YAML config",
        description="Train with a YAML config (see longstream/train/trainer.py for the settings). A run resumes "
        "from the latest complete checkpoint in its output folder.",
    )
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("--steps", type=_positive_int, help="stop at this step (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a setting of the config (VALUE read as YAML: 24, 0.0001, true, a path; YAML "
                   "reads 1e-4 as text, write 0.0001 or 1.0e-4); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _settings(pairs: list[str]) -> dict:
    """["key=value", ...] -> {key: YAML value of value}."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--set {key.strip()}: {value!r} is not a YAML value") from None
    return out


def _run_train(args: argparse.Namespace) -> None:
    from .train.trainer import train_from_config

    folder = train_from_config(args.config, steps=args.steps, progress=not args.quiet,
                               overrides=_settings(args.overrides))
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, from rank 0
        print(f"checkpoints in {folder}")


def _world_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "world", help="render the procedural world into a latent training dataset",
        description="Render clips of the procedural world (coloured shapes moving over plain backgrounds, with "
        "prompts) and encode them with a trained VAE into a latent dataset for `longstream train`. Writes the "
        "VAE with its fitted latent statistics to OUT/vae.safetensors. Resumable.",
    )
    p.add_argument("output", help="dataset folder to write (or complete)")
    p.add_argument("--vae", required=True, metavar="FILE", help="trained VAE (model.safetensors of a vae run)")
    p.add_argument("--clips", type=_positive_int, default=2000, help="number of clips (default 2000)")
    p.add_argument("--frames", type=_positive_int, default=33, help="video frames per clip, 1 + 4k (default 33)")
    p.add_argument("--size", type=_positive_int, default=128, help="frame size in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first clip (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_world)


def _run_world(args: argparse.Namespace) -> None:
    from .devices import resolve_device
    from .train.world_data import build_world_dataset

    if (args.frames - 1) % 4:
        raise UsageError(f"--frames must be 1 + 4k (a causal video VAE), got {args.frames}")
    if args.size % 16:
        raise UsageError(f"--size must be a multiple of 16 (VAE x8, patch 2), got {args.size}")
    out = build_world_dataset(args.vae, args.output, clips=args.clips, frames=args.frames, size=args.size,
                              seed=args.seed, device=resolve_device(args.device), progress=not args.quiet)
    print(f"dataset in {out}")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a model of the procedural world (prompt adherence, shot switches, stability)",
        description="Generate a fixed, seeded set of world prompts in each mode and read colour, shape and motion "
        "back from the pixels (no learned metric); print a table beside chance, the rendered world and the "
        "world through the model's VAE (the ceiling of its generator).",
    )
    modes = "bf16,fp8,nvfp4,nvfp4-kv"  # eval.world_eval.MODES (not imported at parse time)
    p.add_argument("--modes", default=modes, help=f"comma-separated, from {modes} (default all)")
    p.add_argument("--prompts", type=_positive_int, default=24, help="single-shot prompts (default 24)")
    p.add_argument("--switches", type=_positive_int, default=12, help="two-shot videos (default 12)")
    p.add_argument("--steps", type=int, choices=(4, 2), help="sampling steps (default: the preset's)")
    p.add_argument("--checkpoint", metavar="FILE", help="transformer weights (default: the embedded model)")
    p.add_argument("--vae", metavar="FILE", help="VAE file with its latent statistics (default: the embedded model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt set and noise (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from .eval.world_eval import eval_set, evaluate, format_table, write_json

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise UsageError(f"--modes names no mode: {args.modes!r}")
    if args.json:
        output_file(args.json, ".json", "--json")
    if args.vae and not os.path.isfile(args.vae):
        raise UsageError(f"--vae {args.vae}: no such file")
    result = evaluate(eval_set(args.prompts, args.switches, args.seed), modes, checkpoint=args.checkpoint,
                      vae=args.vae, steps=args.steps, seed=args.seed, device=args.device, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)


def _lora_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge one into a checkpoint",
                       description="Work with standalone LoRA files.")
    lsub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    m = lsub.add_parser("merge", help="fold a LoRA into a transformer checkpoint",
                        description="Write BASE with LORA folded into its weights to OUTPUT (safetensors).")
    m.add_argument("base", help="transformer checkpoint (longstream safetensors)")
    m.add_argument("lora", help="LoRA file")
    m.add_argument("output", help="merged checkpoint to write")
    m.set_defaults(run=_run_lora_merge)


def _run_lora_merge(args: argparse.Namespace) -> None:
    from .model.checkpoints import FORMAT, CheckpointError, load_transformer, save_transformer
    from .model.lora import FORMAT as LORA_FORMAT
    from .model.lora import LoRAError, merge_lora_file
    from .safetensors_io import holds, read_format

    output_file(args.output, ".safetensors")
    base, lora = read_format(args.base, CheckpointError, "checkpoint"), read_format(args.lora, LoRAError, "LoRA")
    if (base, lora) == (LORA_FORMAT, FORMAT):
        raise UsageError(f"BASE and LORA are swapped: {args.base} is the LoRA, {args.lora} the checkpoint (usage: "
                         "longstream lora merge BASE LORA OUTPUT)")
    for role, path, got, want in (("BASE", args.base, base, FORMAT), ("LORA", args.lora, lora, LORA_FORMAT)):
        if got != want:
            what = holds(got) if got else "weights of no longstream format (see `longstream convert`)"
            raise UsageError(f"{role} {path} holds {what}, not {holds(want)} (usage: longstream lora merge BASE "
                             "LORA OUTPUT)")
    model = load_transformer(args.base)
    model.load_state_dict(merge_lora_file(model.state_dict(), args.lora), strict=True)
    save_transformer(model, args.output)
    print(f"wrote {args.output}")


CONVERT_FORMATS = ("diffusers", "wan", "longlive", "longlive-lora")  # longstream.convert.FORMATS, without torch


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert downloaded weights to longstream's safetensors layout",
        description="Convert a Wan transformer (diffusers folder, original Wan safetensors, LongLive .pt) to a "
        "longstream checkpoint, optionally pre-quantized, or a LongLive LoRA .pt to a longstream LoRA. The source "
        "format and model shape are detected; nothing is downloaded. The output is written atomically.",
    )
    p.add_argument("source", help="diffusers folder (or pipeline folder), Wan .safetensors file or folder, or .pt")
    p.add_argument("output", help="longstream .safetensors file to write")
    p.add_argument("--format", choices=CONVERT_FORMATS, help="source format (default: detected)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model the weights must be for (default: any)")
    p.add_argument("--quantize", choices=("fp8", "nvfp4"), help="store fp8 (W8A8) or nvfp4 (W4A4) linear weights")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="cast the weights (default: keep the source's)")
    p.add_argument("--ema", action="store_true", help="LongLive: take generator_ema instead of generator")
    p.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                   help="LongLive LoRA: its alpha (scale = alpha / rank; default the rank, LongLive's default)")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    import torch

    from .config import get_preset
    from .convert import convert_checkpoint

    fmt = convert_checkpoint(
        args.source, args.output, fmt=args.format, quantize=args.quantize, ema=args.ema, lora_alpha=args.lora_alpha,
        expected=get_preset(args.preset).transformer if args.preset else None,
        dtype={"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype],
    )
    print(f"wrote {args.output} (from {fmt}{', ' + args.quantize if args.quantize else ''})")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: end-to-end streaming throughput",
                       description="Measure the streaming pipeline on this machine.")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    e = bsub.add_parser(
        "e2e", help="FPS, time to first frame, memory and a per-component breakdown of DiT + VAE streaming",
        description="Stream chunks with random weights and measure steady-state video FPS, DiT FPS, time to first "
        "frame, peak GPU memory, a per-chunk breakdown (linears, attention, cache-write pass, VAE, other), the "
        "latent error against eager bf16 with a dense KV cache, and the roofline ceiling. Comma lists make a sweep: "
        "every combination is one row. Method: longstream/bench/e2e.py.",
    )
    e.add_argument("--preset", default="wan2.2-ti2v-5b", choices=sorted(PRESETS),
                   help="model preset (default wan2.2-ti2v-5b)")
    e.add_argument("--height", type=int, help="video height (default: the preset's)")
    e.add_argument("--width", type=int, help="video width (default: the preset's)")
    e.add_argument("--chunks", type=_positive_int, default=12,
                   help="chunks per timed stream; measured from the first at a full KV window (default 12)")
    e.add_argument("--steps", help="sampling steps, comma list (default: the preset's)")
    e.add_argument("--linear", default="bf16", help="linear formats, comma list of bf16, fp8, nvfp4 (default bf16)")
    e.add_argument("--kv-cache", default="dense",
                   help="KV-cache storage, comma list of dense, fp8, nvfp4 (default dense)")
    e.add_argument("--attention", default="bf16",
                   help="self-attention matmuls, comma list of bf16, fp8 (fp8 rows need the fp8 KV cache; default "
                        "bf16)")
    e.add_argument("--async-decode", default="on",
                   help="VAE decode on a worker overlapping the DiT, comma list of on, off (default on)")
    e.add_argument("--fusion", default="on",
                   help="compiled elementwise block steps on CUDA (norms, modulation, RoPE, residuals), comma list "
                        "of on, off (default on)")
    e.add_argument("--fuse-qkv", default="on",
                   help="self-attention's q, k, v from one projection (one GEMM and activation quantize), comma list "
                        "of on, off (default on)")
    e.add_argument("--no-vae", action="store_true", help="time the DiT alone (no VAE built)")
    e.add_argument("--vae-dtype", default="bf16", choices=("bf16", "fp8"),
                   help="VAE decode: bf16, or fp8 (the residual blocks' convolutions on FP8 tensor cores; Hopper)")
    e.add_argument("--decode-device", metavar="DEVICE",
                   help="decode the VAE on this device, e.g. cuda:1 (default: the DiT's device)")
    e.add_argument("--compile", nargs="?", const="max-autotune-no-cudagraphs", metavar="MODE",
                   help="torch.compile each transformer pass: max-autotune-no-cudagraphs (without MODE) or default")
    e.add_argument("--text-tokens", type=_positive_int, default=512,
                   help="prompt embedding length (default 512, umT5's)")
    e.add_argument("--seed", type=int, default=0, help="noise and prompt seed (default 0)")
    e.add_argument("--peak-tflops", metavar="FORMAT=TFLOPS,...",
                   help="roofline compute peaks per linear format (default bf16=780,fp8=1300,nvfp4=780: H100)")
    e.add_argument("--peak-tbps", type=float, help="roofline memory bandwidth in TB/s (default 3.0)")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON (rewritten after every row)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    e.add_argument("--quiet", action="store_true", help="no per-row progress lines")
    e.set_defaults(run=_run_bench_e2e)


def _run_bench_e2e(args: argparse.Namespace) -> None:
    from .bench.e2e import E2ERequest, run_e2e
    from .bench.report import format_table

    result = run_e2e(E2ERequest(
        preset=args.preset, height=args.height, width=args.width, chunks=args.chunks, steps=args.steps,
        linear=args.linear, kv_cache=args.kv_cache, attention=args.attention, async_decode=args.async_decode,
        fusion=args.fusion, fuse_qkv=args.fuse_qkv,
        vae=not args.no_vae, vae_dtype=args.vae_dtype, compile=args.compile, text_tokens=args.text_tokens,
        seed=args.seed,
        peak_tflops=args.peak_tflops, peak_tbps=args.peak_tbps, json=args.json, device=args.device,
        decode_device=args.decode_device, progress=not args.quiet,
    ))
    print(format_table(result))


def _run_info(args: argparse.Namespace) -> None:
    for name, preset in PRESETS.items():
        t, s = preset.transformer, preset.stream
        print(
            f"{name:16s} dim {t.dim:5d}  heads {t.num_attention_heads:3d}  layers {t.num_layers:3d}  "
            f"ffn {t.ffn_dim:6d}  latent ch {t.in_channels:3d}  VAE x{preset.vae.spatial}/x{preset.vae.temporal}  "
            f"{preset.width}x{preset.height}@{preset.fps}  chunk {s.chunk_frames}  window {s.window_frames}  "
            f"sink {s.sink_frames}  steps {s.steps}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longstream",
        description="Long, streaming, interactive video generation with autoregressive video diffusion.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _generate_parser(sub)
    _train_parser(sub)
    _world_parser(sub)
    _eval_parser(sub)
    _lora_parser(sub)
    _convert_parser(sub)
    _bench_parser(sub)
    info = sub.add_parser("info", help="list the model presets", description="List the model presets.")
    info.set_defaults(run=_run_info)
    return parser


def _quiet_third_party_logs() -> None:
    """Keep the terminal to our own progress and errors: diffusers imports torchao (when installed), which logs
    about optional CUDA extensions and deprecated pytree registrations that say nothing about this run."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not break the clean-up of the first
    raise KeyboardInterrupt


def _interrupt_on_termination() -> dict:
    """SIGTERM and SIGHUP (a closed terminal, `kill`, a batch scheduler) end a run as Ctrl-C does, so the clean-up
    that removes partial output runs for them too. Returns the handlers replaced, to restore afterwards."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # handlers can only be set from the main thread (main() called from another thread)
    signals = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    # only where the default (death) is in force: `nohup` ignores SIGHUP, and that must stay so
    return {sig: signal.signal(sig, _interrupt) for sig in signals if signal.getsignal(sig) is signal.SIG_DFL}


def _refused_by_file_system(exc: OSError) -> bool:
    """A full disk, a read-only or foreign file system, a missing permission: the user's to fix, one line."""
    return isinstance(exc, (PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)) or \
        exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_third_party_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    replaced = _interrupt_on_termination()
    try:
        args.run(args)
    except LongstreamError as exc:
        print(f"longstream: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not _refused_by_file_system(exc):
            raise
        print(f"longstream: error: {exc}", file=sys.stderr)  # partial output is removed where it was raised
        return 1
    except KeyboardInterrupt:
        print("longstream: interrupted (a partial video is removed; finished files and checkpoints are kept)",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)  # SIG_DFL, as found
    return 0


if __name__ == "__main__":
    sys.exit(main())
