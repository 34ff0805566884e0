"""`longstream train CONFIG.yaml`: the training loop.

- Objectives: `flow_matching` (bidirectional base model) and `teacher_forcing` (AR tune), see `objectives.py`;
  `dmd` (few-step distillation of the `init` model against the `teacher`, optionally only a LoRA), see `dmd.py`;
  `vae` (the world's VAE), see `vae_objective.py` (`clip_frames` counts video frames there, latent frames elsewhere).
- Data: a latent dataset folder (`data:`, `data.py`), or `videos: world` with `vae: FILE`: clips rendered and
  encoded during the step, each SP rank encoding only its frames (`video_source.py`).
- GEMM modes `bf16` | `fp8` | `nvfp4` (`quant.training.convert_for_training`), gradient accumulation, EMA.
- Determinism: step k's batch and noise depend only on (seed, k), so a resumed run continues exactly where an
  uninterrupted one would be, on the same kind of device (the noise is drawn on the run's device: a CPU run and a
  GPU run, or two GPU models, draw different numbers from one seed).
- Checkpoints: `OUTPUT/checkpoints/step_XXXXXXXX/` with `model.safetensors`, `ema.safetensors` (when EMA is on),
  `optimizer.pt` and `state.json`. Each is written into a hidden `.step_XXXXXXXX.partial/` folder, fsynced and
  renamed into place, so a run killed mid-save leaves the previous checkpoint as the latest complete one.
  A run finds the latest complete checkpoint in its output folder and resumes from it.
- Metrics: one JSON line per logged step in `OUTPUT/metrics.jsonl` (and TensorBoard when installed); progress bar.
- A NaN or infinite loss stops the run with an error naming the step.
- Under `torchrun --nproc-per-node N`: data parallel (FSDP2) x sequence parallel (`sp`, Balanced SP for teacher
  forcing), computing the single-process step; rank 0 writes checkpoints, metrics and the progress bar. See
  `distributed.py`.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, get_preset
from ..devices import resolve_device
from ..errors import LongstreamError
from ..model.checkpoints import FORMAT as TRANSFORMER_FORMAT
from ..model.checkpoints import CheckpointError, load_transformer, save_transformer
from ..model.transformer import CausalWanTransformer
from ..parallel import ParallelContext
from ..safetensors_io import holds, read_format
from ..text.encoders import HashTextEncoder
from .data import LatentClipDataset
from .distributed import PARALLEL_OBJECTIVES, ParallelTraining, check_layout, launched_world_size, write_transformer
from .objectives import flow_matching_loss, teacher_forcing_loss

OBJECTIVES = ("flow_matching", "teacher_forcing", "dmd", "vae")
PATH_SETTINGS = ("data", "output", "init", "teacher", "vae")  # settings that name files or folders


class TrainingError(LongstreamError):
    """A run that cannot go on (diverged loss, unusable checkpoint)."""


def _freeze_all_but(model: torch.nn.Module, patterns: list) -> None:
    names = [n for n, _ in model.named_parameters()]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"trainable must be a list of name patterns, got {patterns!r}")
    chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not chosen:
        raise ConfigError(f"trainable patterns {patterns} match no parameter (names look like {names[0]})")
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)


def run_weights(path: str | Path, names: tuple[str, ...] = ("ema.safetensors", "model.safetensors")) -> Path:
    """`path` itself when it is a file; for a run folder, the first of `names` in its latest complete checkpoint
    (by default the EMA weights when the run kept them, else the model)."""
    path = Path(path)
    if path.is_file():
        return path
    ckpts = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "state.json").is_file())
    if not ckpts:
        raise TrainingError(f"{path}: neither a weights file nor a run folder with a complete checkpoint")
    for name in names:
        if (ckpts[-1] / name).is_file():
            return ckpts[-1] / name
    raise TrainingError(f"{ckpts[-1]}: holds none of {', '.join(names)}")


@dataclass
class TrainConfig:
    objective: str
    data: str | None = None  # latent dataset folder (not used by `vae`, which renders the procedural world)
    videos: str | None = None  # instead of data: "world" clips encoded during the step by `vae` (video_source.py)
    vae: str | None = None  # with videos: the VAE file (with its latent statistics) that encodes them
    output: str = ""
    preset: str = "tiny"
    init: str | None = None  # weights to start from (a file, or a run folder: see run_weights)
    teacher: str | None = None  # dmd: the real-score model (the bidirectional base; file or run folder)
    negative_prompt: str | None = None  # dmd with guidance: the teacher's negative prompt
    dmd: dict | None = None  # dmd: DMDConfig settings (steps, guidance_scale, critic_lr, ...)
    lora: dict | None = None  # dmd: train only a LoRA (LoRAConfig settings), e.g. the 4 -> 2-step adapter
    trainable: list | None = None  # glob patterns of the parameter names to train (default: all), e.g. decoder.*
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping; dmd clips in its own settings)
    activation_checkpointing: bool = False  # recompute each block in the backward pass (less memory, ~1/3 more work)
    warmup_steps: int = 0
    clip_frames: int = 8
    chunk_frames: int | None = None  # teacher forcing; default: the preset's chunk
    shift: float = 5.0
    ema: float = 0.0  # decay (reached after a warm-up, Trainer.ema_decay); 0 turns EMA off
    gemm: str = "bf16"
    kl_weight: float = 1e-6  # vae: weight of the KL term (clip_frames counts video frames, 1 + 4k)
    object_weight: float = 0.0  # vae: extra loss weight of the object's pixels (see vae_objective.vae_loss)
    edge_weight: float = 0.0  # vae: weight of the spatial-gradient error (vae_objective.edge_error)
    crop: int = 0  # vae: train on random crop x crop windows of the rendered frames (0: whole frames)
    vae_width: int = 0  # vae, without init: the VAE's base channel count (0: the preset VAE's)
    stream_warmup: int = 0  # vae: up to this many leading latent frames run without gradient (draw_warm)
    vae_autocast: bool = False  # vae on CUDA: forward in bf16 autocast (weights, optimizer and loss in float32)
    channels_last: bool = False  # vae: weights and clips channels-last (NDHWC), cuDNN's tensor-core layout (CUDA)
    max_seconds: float = 0.0  # stop (with a checkpoint) after this much training time; 0: no limit
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    sp: int = 1  # under torchrun: sequence-parallel group size (dp = processes / sp); see distributed.py

    def __post_init__(self) -> None:
        for name, kind in (("steps", int), ("batch_size", int), ("grad_accum", int), ("clip_frames", int),
                           ("save_every", int), ("log_every", int), ("seed", int), ("warmup_steps", int),
                           ("lr", (int, float)), ("weight_decay", (int, float)), ("shift", (int, float)),
                           ("ema", (int, float)), ("kl_weight", (int, float)), ("max_seconds", (int, float)),
                           ("object_weight", (int, float)), ("edge_weight", (int, float)),
                           ("max_grad_norm", (int, float)),
                           ("crop", int), ("vae_width", int), ("stream_warmup", int), ("sp", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("activation_checkpointing", "vae_autocast", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.output:
            raise ConfigError("output (the run's folder) is required")
        if self.videos is not None:
            from .video_source import SOURCES

            if self.videos not in SOURCES:
                raise ConfigError(f"videos must be one of {', '.join(SOURCES)}, got {self.videos!r}")
            if self.objective not in PARALLEL_OBJECTIVES or self.data or not self.vae:
                raise ConfigError("videos is for flow_matching or teacher_forcing, with a vae file and no data")
        elif self.objective != "vae" and not self.data:
            raise ConfigError(f"objective {self.objective} needs data (a latent dataset folder) or videos")
        elif self.vae:
            raise ConfigError("vae (the VAE that encodes videos) is only used with videos; to start from weights "
                              "use init")
        if self.vae_width and self.objective != "vae":
            raise ConfigError("vae_width is for objective vae")
        if self.vae_width and self.init:
            raise ConfigError("vae_width is for a new VAE; with init the VAE file sets the architecture")
        if self.objective == "vae" and (self.clip_frames - 1) % 4:
            raise ConfigError(f"objective vae trains on 1 + 4k video frames: clip_frames {self.clip_frames} is not")
        for name in ("stream_warmup", "vae_autocast", "channels_last"):
            if getattr(self, name) and self.objective != "vae":
                raise ConfigError(f"{name} is for objective vae")
        if self.chunk_frames is not None and (isinstance(self.chunk_frames, bool) or not isinstance(
                self.chunk_frames, int) or self.chunk_frames <= 0):
            raise ConfigError(f"chunk_frames must be a positive whole number of latent frames, "
                              f"got {self.chunk_frames!r}")
        if self.stream_warmup > (self.clip_frames - 1) // 4:
            raise ConfigError(f"stream_warmup {self.stream_warmup} leaves no latent frame of the clip to train "
                              f"(clip_frames {self.clip_frames} = {(self.clip_frames - 1) // 4 + 1} latent frames)")
        for name in ("steps", "batch_size", "grad_accum", "clip_frames", "save_every", "log_every", "sp"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if self.gemm not in ("bf16", "fp8", "nvfp4"):
            raise ConfigError(f"gemm must be bf16, fp8 or nvfp4, got {self.gemm!r}")
        if self.objective == "dmd" and not (self.init and self.teacher):
            raise ConfigError("objective dmd needs init (the model to distill) and teacher (the real score)")
        if self.objective == "dmd" and self.grad_accum != 1:
            raise ConfigError("objective dmd does not accumulate gradients: set grad_accum to 1")
        if self.lora and self.ema:
            raise ConfigError("ema is not kept for a LoRA-only run: set ema to 0")
        if self.sp > 1 and self.objective not in PARALLEL_OBJECTIVES:
            raise ConfigError(f"sp > 1 is for flow_matching and teacher_forcing, not objective {self.objective}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """The config file's settings, then `overrides` on top, each replacing a whole setting (a mapping such as
        `dmd` too); paths among them are relative to the current directory, the file's to the file."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give its YAML config file (e.g. configs/embedded/base.yaml)")
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        overrides = dict(overrides or {})
        for source, where in ((data, str(path)), (overrides, "--set")):
            unknown = set(source) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
        for source, base in ((data, path.parent), (overrides, Path.cwd())):
            for key in PATH_SETTINGS:  # relative paths: to the config file, or to the current directory
                if isinstance(source.get(key), str) and not os.path.isabs(source[key]):
                    source[key] = os.path.normpath(base / source[key])
        data.update(overrides)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.preset = get_preset(config.preset)
        self.chunk_frames = config.chunk_frames or self.preset.stream.chunk_frames
        if config.objective in ("teacher_forcing", "dmd") and config.clip_frames % self.chunk_frames:
            raise ConfigError(f"clip_frames ({config.clip_frames}) must be a multiple of chunk_frames "
                              f"({self.chunk_frames}) for {config.objective}")
        world = launched_world_size()
        if world > 1:
            check_layout(config.objective, config.sp, world, config.batch_size, config.clip_frames,
                         self.chunk_frames, self.preset.transformer)
        self.ctx = ParallelContext.from_env(config.sp, device=resolve_device(config.device))
        try:
            self._build(world)
        except BaseException:  # a failed build must not leave the process group behind
            self.ctx.close()
            raise

    def _build(self, world: int) -> None:
        config = self.cfg
        self.device = self.ctx.device
        if config.vae_autocast and self.device.type != "cuda":
            raise ConfigError(f"vae_autocast is bf16 autocast on CUDA; this run's device is {self.device}")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 tensor-core matmuls
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv algorithms once
        self.parallel = (ParallelTraining(self.ctx, config.objective, self.chunk_frames, config.shift)
                         if world > 1 else None)
        self.is_main = self.parallel is None or self.parallel.is_main
        self.data = self._build_data()
        self.text = HashTextEncoder(self.preset.transformer.text_dim)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.out = Path(config.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.model = self._build_model()
        if config.trainable is not None:
            _freeze_all_but(self.model, config.trainable)
        self.dmd = self._build_dmd() if config.objective == "dmd" else None
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if config.ema else None
        if self.parallel is not None:
            self.parallel.shard(self.model, self.ema)
        if self.dmd is not None:
            self.opt = self.dmd.generator_opt
        else:
            self.opt = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                weight_decay=config.weight_decay,
            )
        self.step = 0

    def _build_data(self) -> LatentClipDataset | None:
        if self.cfg.videos:
            from ..vae.checkpoints import load_vae
            from ..vae.fast import accelerate

            self.vae = accelerate(load_vae(self.cfg.vae, device=self.device)).eval().requires_grad_(False)
            vae, want = self.vae.config, self.preset.vae
            got = (vae.z_dim, vae.scale_factor_spatial, vae.scale_factor_temporal)
            if got != (want.z_dim, want.spatial, want.temporal) or self.preset.height != self.preset.width:
                raise ConfigError(f"videos: world needs a square preset whose VAE the file matches: {self.cfg.vae} "
                                  f"has (channels, spatial, temporal) {got}, preset {self.cfg.preset} "
                                  f"{(want.z_dim, want.spatial, want.temporal)} at {self.preset.width}x"
                                  f"{self.preset.height}")
            self.encoded_frames = 0  # video frames this rank's encoder ran over (see video_source.py)
            return None
        return LatentClipDataset(self.cfg.data, clip_frames=self.cfg.clip_frames,
                                 channels=self.preset.transformer.in_channels, device=self.device)

    def _build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)
        if self.cfg.init:
            model = self._load_transformer("init", self.cfg.init)
        else:
            model = CausalWanTransformer(self.preset.transformer)
        model = model.to(self.device).train()
        model.checkpoint_blocks = self.cfg.activation_checkpointing
        if self.cfg.gemm != "bf16":
            from ..quant import convert_for_training

            convert_for_training(model, self.cfg.gemm)
        return model

    def _load_transformer(self, setting: str, path: str) -> CausalWanTransformer:
        """The transformer named by setting `init` or `teacher`; a file of another kind (a VAE, a LoRA) is refused
        in one line naming the setting (a file of no longstream format is left to load_transformer's checks)."""
        file = run_weights(path)
        fmt = read_format(file, CheckpointError, "checkpoint")
        if fmt not in (None, TRANSFORMER_FORMAT):
            raise ConfigError(f"{setting} {file} holds {holds(fmt)}, but objective {self.cfg.objective} trains a "
                              "transformer: give a transformer checkpoint or its run folder")
        return load_transformer(file, expected=self.preset.transformer)

    def _build_dmd(self):
        from ..model.lora import LoRAConfig
        from .dmd import DMDConfig, DMDTrainer

        teacher = self._load_transformer("teacher", self.cfg.teacher).to(self.device)
        settings = dict(self.cfg.dmd or {})
        if self.cfg.lora:
            settings["lora"] = LoRAConfig(**self.cfg.lora)
        try:
            dmd_config = DMDConfig(chunk_frames=self.chunk_frames, generator_lr=self.cfg.lr, **settings)
        except TypeError as exc:
            raise ConfigError(f"bad dmd or lora settings: {exc}") from None
        if dmd_config.guidance_scale != 1.0 and not self.cfg.negative_prompt:
            raise ConfigError("dmd with guidance_scale != 1 needs a negative_prompt")
        return DMDTrainer(self.model, teacher, dmd_config)

    # -- data -------------------------------------------------------------------------------------------------
    def _text(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in self._text_cache:
                self._text_cache[p] = self.text.encode([p])[0]  # on the host: one entry per distinct prompt
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.device)

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches of `step` (batch_size examples each)."""
        if self.cfg.videos:
            return [self._encoded_batch(step, micro) for micro in range(self.cfg.grad_accum)]
        out = []
        for micro in range(self.cfg.grad_accum):
            idx = self.data.batch_indices(step * self.cfg.grad_accum + micro, self.cfg.batch_size, self.cfg.seed)
            if self.parallel is not None:
                idx = self.parallel.batch_part(idx)
            items = [self.data.load(i) for i in idx]
            latents = torch.stack([x for x, _ in items])
            out.append((latents, self._text([p for _, p in items])))
        return out

    def _encoded_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """World clips of a micro-batch, encoded: all latent frames in one process, under SP only this rank's."""
        from .video_source import encode_frames, world_batch

        indices = list(range(self.cfg.batch_size))
        start, end = 0, self.cfg.clip_frames
        if self.parallel is not None:
            indices = self.parallel.batch_part(indices)
            start, end = self.parallel.frame_range(self.cfg.clip_frames)
        videos, prompts = world_batch(self.cfg.seed, step, micro, indices, self.cfg.clip_frames, self.preset.height)
        latents, frames = encode_frames(self.vae, videos, start, end)
        self.encoded_frames += frames
        return latents, self._text(prompts)

    def loss(self, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel.loss(self.model, latents, text, self.cfg.batch_size, generator,
                                      num_frames=self.cfg.clip_frames)
        if self.cfg.objective == "flow_matching":
            return flow_matching_loss(self.model, latents, text, shift=self.cfg.shift, generator=generator)
        return teacher_forcing_loss(self.model, latents, text, chunk_frames=self.chunk_frames,
                                    shift=self.cfg.shift, generator=generator)

    # -- loop ---------------------------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def train_step(self) -> float:
        step = self.step
        # drawn on the run's device: on a GPU, drawing it on the host was a step's largest host cost (bench/RESULTS.md)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + step)
        for group in self.opt.param_groups:
            group["lr"] = self._lr(step)
        if self.dmd is not None:
            return self._dmd_step(step, generator)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        micro_batches = self._micro_batches(step)
        for i, (latents, text) in enumerate(micro_batches):
            if self.parallel is not None:
                self.parallel.sync_gradients(self.model, i == len(micro_batches) - 1)
            with self._autocast():
                loss = self.loss(latents, text, generator) / self.cfg.grad_accum
            value = self.parallel.reduce_loss(loss) if self.parallel is not None else loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"loss is {value} at step {step}; stopping (last checkpoint kept)")
            loss.backward()
            total += value
        if self.parallel is not None:
            self.parallel.reduce_gradients(self.model)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self._after_step()
        return total

    def _autocast(self) -> torch.autocast:
        """Transformer objectives on CUDA with `gemm: bf16` run their forward matmuls in bf16 (weights, optimizer
        and loss stay fp32), and the VAE with `vae_autocast`; the CPU and fp8/nvfp4 training linears run as
        written (dmd has its own step, not autocast)."""
        wanted = self.cfg.vae_autocast if self.cfg.objective == "vae" else self.cfg.gemm == "bf16"
        enabled = self.device.type == "cuda" and wanted
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _dmd_step(self, step: int, generator: torch.Generator) -> float:
        latents, text = self._micro_batches(step)[0]
        negative = None
        if self.dmd.cfg.guidance_scale != 1.0:
            negative = self._text([self.cfg.negative_prompt] * latents.shape[0])
        out = self.dmd.step(latents, text, negative, generator)
        for name in ("generator_loss", "critic_loss"):
            if not math.isfinite(out[name]):
                raise TrainingError(f"{name} is {out[name]} at step {step}; stopping (last checkpoint kept)")
        self._after_step()
        return out["generator_loss"]

    def ema_decay(self) -> float:
        """The EMA's decay for the update after step `self.step`: the configured `ema`, warmed up as
        (1 + step) / (10 + step) (diffusers' EMAModel default; 0.999 from step ~9000 on). A fixed 0.999 keeps
        0.999**n of the starting weights, random in a run from scratch: 22% after 1500 steps. Warmed up, their
        share is 9! n! / (n + 9)!: 5e-9 after 30 steps."""
        return min(self.cfg.ema, (1 + self.step) / (10 + self.step))

    def _after_step(self) -> None:
        if self.ema is not None:
            decay = self.ema_decay()
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        self.step += 1

    def run(self, steps: int | None = None, progress: bool = True) -> list[float]:
        """Train until `steps` (default: the config's), resuming from the latest checkpoint; returns the losses."""
        from tqdm import tqdm

        target = steps if steps is not None else self.cfg.steps
        self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        losses = []
        saved_at = self.step
        log = open(self.out / "metrics.jsonl", "a", encoding="utf-8") if self.is_main else None
        board = _tensorboard(self.out / "tensorboard") if self.is_main else None
        start_time = time.time()
        try:
            with tqdm(total=target, initial=self.step, unit="step", disable=not (progress and self.is_main)) as bar:
                while self.step < target and not self._out_of_time(start_time):
                    loss = self.train_step()
                    losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if log is not None and (self.step % self.cfg.log_every == 0 or self.step == target):
                        log.write(json.dumps({"step": self.step, "loss": loss, "lr": self._lr(self.step - 1),
                                              "elapsed_s": round(time.time() - start_time, 2)}) + "\n")
                        log.flush()
                        if board is not None:
                            board.add_scalar("loss", loss, self.step)
                    if self.step % self.cfg.save_every == 0 or self.step == target:
                        self.save()
                        saved_at = self.step
            if saved_at != self.step:
                self.save()  # stopped by max_seconds between checkpoints
        finally:
            if log is not None:
                log.close()
            if board is not None:
                board.close()
        return losses

    def _out_of_time(self, start_time: float) -> bool:
        if not self.cfg.max_seconds:
            return False
        late = time.time() - start_time >= self.cfg.max_seconds
        return self.parallel.any_rank(late) if self.parallel is not None else late

    def close(self) -> None:
        """Release the process group this trainer created (under torchrun)."""
        self.ctx.close()

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _complete_checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                      and (p / "state.json").is_file())

    def save(self) -> Path:
        """Write the checkpoint of the current step (every rank calls it; rank 0 writes)."""
        files = self._checkpoint_files()
        final = self.ckpt_dir / f"step_{self.step:08d}"
        if self.is_main:
            self._write_checkpoint(final, files)
        if self.parallel is not None:
            self.parallel.barrier()
        return final

    def _checkpoint_files(self) -> dict[str, Callable[[Path], None]]:
        """File name -> writer; in a distributed run the full tensors are gathered here (a collective)."""
        lora_only = self.dmd is not None and self.dmd.cfg.lora is not None
        files: dict[str, Callable[[Path], None]] = {}
        if lora_only:
            files["lora.safetensors"] = self.dmd.save_lora  # only the adapter is trained
        else:
            files["model.safetensors"] = self._model_writer(self.model)
        if self.ema is not None and not lora_only:
            files["ema.safetensors"] = self._model_writer(self.ema)
        if self.dmd is not None:
            files["critic.safetensors"] = lambda path: save_transformer(self.dmd.critic, path)
            optim = {"generator": self.opt.state_dict(), "critic": self.dmd.critic_opt.state_dict()}
        elif self.parallel is not None:
            optim = self.parallel.full_optimizer_state(self.opt)
        else:
            optim = self.opt.state_dict()
        files["optimizer.pt"] = lambda path: torch.save(optim, path)
        return files

    def _model_writer(self, model: torch.nn.Module) -> Callable[[Path], None]:
        if self.parallel is None:
            return lambda path: self._save_model(model, path)
        state = self.parallel.full_state(model)
        return lambda path: write_transformer(state, model.config, path)

    def _write_checkpoint(self, final: Path, files: dict[str, Callable[[Path], None]]) -> None:
        tmp = self.ckpt_dir / f".{final.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, write in files.items():
            write(tmp / name)
        state = {"step": self.step, "config": asdict(self.cfg)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def resume(self) -> bool:
        """Load the latest complete checkpoint of the output folder, if any (rank 0's choice on every rank);
        partial ones are removed."""
        if self.is_main and self.ckpt_dir.is_dir():
            for partial in self.ckpt_dir.glob(".step_*.partial"):
                shutil.rmtree(partial, ignore_errors=True)
        latest = (self._complete_checkpoints() or [None])[-1]
        if self.parallel is not None:
            latest = self.parallel.from_main(latest)
        if latest is None:
            return False
        state = json.loads((latest / "state.json").read_text())
        if (latest / "lora.safetensors").is_file():
            from ..model.lora import load_lora

            load_lora(self.model, latest / "lora.safetensors")
        else:
            self._load_into(self.model, latest / "model.safetensors")
        if self.ema is not None:  # a run that turns EMA on later starts it from the resumed weights
            if (latest / "ema.safetensors").is_file():
                self._load_into(self.ema, latest / "ema.safetensors")
            else:
                self.ema.load_state_dict(self.model.state_dict())
        where = "cpu" if self.parallel is not None else self.device  # several ranks: shard from host memory
        optim = torch.load(latest / "optimizer.pt", map_location=where, weights_only=True)
        if self.dmd is not None:
            self._load_into(self.dmd.critic, latest / "critic.safetensors")
            self.dmd.critic_opt.load_state_dict(optim["critic"])
            optim = optim["generator"]
        if self.parallel is not None:
            self.parallel.load_optimizer_state(self.opt, optim)
        else:
            self.opt.load_state_dict(optim)
        self.step = int(state["step"])
        return True

    def _save_model(self, model: torch.nn.Module, path: Path) -> None:
        save_transformer(model, path)

    def _load_into(self, model: torch.nn.Module, path: Path) -> None:
        state = load_transformer(path, expected=self.preset.transformer).state_dict()
        if self.parallel is not None:
            self.parallel.load_full_state(model, state)
        else:
            model.load_state_dict(state, strict=True)


class VAETrainer(Trainer):
    """`objective: vae`: the preset's video VAE on rendered world clips (`vae_objective.py`); the checkpoint's
    `model.safetensors` is a VAE file (`vae/checkpoints.py`)."""

    def _build_data(self) -> None:
        crop, size, factor = self.cfg.crop, self.preset.height, self.preset.vae.spatial
        if crop and (crop > size or crop % factor):
            raise ConfigError(f"crop {crop} must be a multiple of {factor} and at most the frame size {size}")
        return None

    def _build_model(self) -> torch.nn.Module:
        from ..vae import build_vae
        from ..vae.checkpoints import load_vae
        from ..vae.fast import accelerate

        if self.cfg.init:  # e.g. fine-tune the decoder of a VAE whose latent statistics are already fitted
            vae = load_vae(run_weights(self.cfg.init, ("model.safetensors",)), device=self.device)
        else:
            width = {"base_dim": self.cfg.vae_width} if self.cfg.vae_width else {}
            vae = build_vae(self.preset.vae.kind, seed=self.cfg.seed, **width).to(self.device)
        if vae.config.patch_size:
            raise ConfigError("objective vae trains VAEs without patchified frames (Wan2.1 layout), not this one")
        # the CPU fast path (same math, autograd included); on CUDA, steps without gradient use compiled norms
        return accelerate(vae, channels_last=self.cfg.channels_last).train()

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, None]]:
        from .vae_objective import world_videos

        layout = torch.channels_last_3d if self.cfg.channels_last else torch.contiguous_format
        return [(world_videos(self.cfg.seed, step, micro, self.cfg.batch_size, self.cfg.clip_frames,
                              self.preset.height, self.cfg.crop, self.device).contiguous(memory_format=layout), None)
                for micro in range(self.cfg.grad_accum)]

    def loss(self, video: torch.Tensor, text: None, generator: torch.Generator) -> torch.Tensor:
        from .vae_objective import draw_warm, vae_loss

        warm = draw_warm(self.cfg.stream_warmup, generator)
        return vae_loss(self.model, video, kl_weight=self.cfg.kl_weight, object_weight=self.cfg.object_weight,
                        edge_weight=self.cfg.edge_weight, warm=warm)

    def _save_model(self, model: torch.nn.Module, path: Path) -> None:
        from ..vae.checkpoints import save_vae

        save_vae(model, path)

    def _load_into(self, model: torch.nn.Module, path: Path) -> None:
        from ..vae.checkpoints import load_vae

        model.load_state_dict(load_vae(path).state_dict(), strict=True)


def make_trainer(config: TrainConfig) -> Trainer:
    return VAETrainer(config) if config.objective == "vae" else Trainer(config)


def _tensorboard(folder: Path):
    """A TensorBoard writer when the `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def train_from_config(path: str | Path, steps: int | None = None, progress: bool = True,
                      overrides: dict[str, Any] | None = None) -> Path:
    """Run a config, with `overrides` of its settings (under torchrun: on every rank of the run)."""
    trainer = make_trainer(TrainConfig.from_yaml(path, overrides))
    try:
        trainer.run(steps, progress=progress)
    finally:
        trainer.close()
    return trainer.ckpt_dir
