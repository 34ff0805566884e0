"""Few-step distillation by Distribution Matching Distillation (DMD2, as Self-Forcing and LongLive use it).

Three networks, all flow-matching models in Wan's convention (x_t = (1 - s) x0 + s noise, velocity noise - x0,
timestep 1000 s, so x0 = x_t - s v):

- generator (the student, trained): an AR model sampled with a few steps (`FewStepSampler`'s schedule: 4 at shift
  5, or 2). `few_step_rollout` generates a clip chunk by chunk with its OWN previous chunks as clean history
  (self forcing), exactly what streaming inference does, so training sees the inference-time distribution.
- teacher ("real score", frozen): the many-step diffusion model, optionally with classifier-free guidance.
- critic ("fake score", trained): a diffusion model fitted by flow matching to the generator's current samples;
  it starts as a copy of the teacher, so the two agree before the generator drifts.

DMD moves the generator's samples along the difference of the two scores. For a sample x0 the step draws one
noise level s per clip (uniform in [s_min, s_max], then warped by `score_shift`) and noise, forms x_t, and asks
both models for x0: `x0_real` (teacher) and `x0_fake` (critic). The update direction is

    grad = (x0_fake - x0_real) / mean|x0 - x0_real|        (mean per sample, over C, F, h, w)

and the generator loss is 0.5 * mse(x0, (x0 - grad).detach()), whose gradient w.r.t. x0 is grad / x0.numel().
The normalization (DMD's) makes the step size independent of how far the sample is from the teacher's
denoising at this s: the direction carries the information, the learning rate sets the step.

Teacher and critic run bidirectionally (`causal=False`) on the whole clip: DMD matches the distribution of
whole clips, and the teacher in this recipe is the bidirectional base model (Self-Forcing's real score is the
bidirectional Wan model, the fake score its copy). Causality lives in the generator only: it is what gets
streamed, and its rollout is causal by construction.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..model.lora import LoRAConfig, inject_lora, save_lora
from ..model.transformer import CausalWanTransformer
from ..pipeline.schedule import few_step_sigmas


def _randn(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Float32 normal noise drawn on the generator's device (CPU by default: then a seed gives the same numbers
    whatever `like`'s device), moved to `like`'s device/dtype."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(like)


def few_step_rollout(
    generator: CausalWanTransformer,
    noise: torch.Tensor,
    text: torch.Tensor,
    *,
    chunk_frames: int,
    sigmas: Sequence[float],
    renoise_generator: torch.Generator | None,
    grad_last_step: bool = True,
) -> torch.Tensor:
    """Self-forcing AR generation of a clip; returns x0 [B, C, F, h, w].

    Chunk c (frames [c*n, (c+1)*n), n = `chunk_frames`) is denoised from `noise[:, :, c*n:(c+1)*n]` with the
    few-step schedule `sigmas` (x0 predicted at each sigma, re-noised with fresh noise from `renoise_generator` to
    the next one; the same arithmetic and draw order as `FewStepSampler`). Every model call is one masked forward
    over [generated chunks 0..c-1 at t = 0 (detached), current chunk at t = 1000 sigma] under the block-causal
    mask, i.e. what the KV-cache stream computes with a window holding the whole clip. With `grad_last_step` the
    last denoising step of each chunk keeps its graph (the earlier ones run under no_grad); without it, or
    inside an outer no_grad, nothing does.
    """
    b, _, frames = noise.shape[:3]
    if frames % chunk_frames:
        raise ValueError(f"clip of {frames} latent frames is not a whole number of {chunk_frames}-frame chunks")
    if not sigmas:
        raise ValueError("sigmas is empty")
    grad = grad_last_step and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad):
        context = generator.prepare_text(text)
    outputs: list[torch.Tensor] = []
    for start in range(0, frames, chunk_frames):
        history = torch.cat(outputs, dim=2).detach() if outputs else noise.detach()[:, :, :0]
        t_history = torch.zeros(b, start, device=noise.device)

        def x0_of(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = torch.cat([t_history, torch.full((b, chunk_frames), 1000.0 * sigma, device=noise.device)], dim=1)
            v = generator(torch.cat([history, x], dim=2), t, context, causal=True, chunk_frames=chunk_frames)
            return x - sigma * v[:, :, start:]

        x = noise[:, :, start : start + chunk_frames]
        with torch.no_grad():
            for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
                x0 = x0_of(x, sigma)
                x = (1 - nxt) * x0 + nxt * _randn(x0.shape, x0, renoise_generator)
        with torch.set_grad_enabled(grad):
            outputs.append(x0_of(x, sigmas[-1]))
    return torch.cat(outputs, dim=2)


def score_sigmas(
    batch: int, *, s_min: float, s_max: float, shift: float, generator: torch.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """One noise level per clip for the scores: uniform in [s_min, s_max], then shifted (s -> shift s / (1 +
    (shift - 1) s)), as Self-Forcing draws its DMD timesteps in [20, 980] before the scheduler's shift."""
    u = torch.rand((batch,), generator=generator, device=generator.device if generator is not None else "cpu")
    u = s_min + (s_max - s_min) * u
    return (shift * u / (1 + (shift - 1) * u)).to(device)


def _noised(
    x0: torch.Tensor, s_min: float, s_max: float, shift: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, s [B], noise) for float32 x0, with s drawn before the noise."""
    s = score_sigmas(x0.shape[0], s_min=s_min, s_max=s_max, shift=shift, generator=generator, device=x0.device)
    noise = _randn(x0.shape, x0, generator)
    sb = s.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sb) * x0 + sb * noise, s, noise


@torch.no_grad()
def dmd_gradient(
    teacher: nn.Module,
    critic: nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor | None = None,
    *,
    guidance_scale: float = 1.0,
    s_min: float = 0.02,
    s_max: float = 0.98,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DMD direction (float32, x0's shape) for generator samples x0: (x0_fake - x0_real) / mean|x0 - x0_real|.

    x0_real is the teacher's x0 prediction at a random noise level, with classifier-free guidance on
    `negative_text` when `guidance_scale` != 1 (v = v_neg + g (v - v_neg)); x0_fake is the critic's, unguided.
    Both run with `causal=False`. The normalizer is clamped at 1e-8 (a sample equal to the teacher's
    prediction would otherwise divide by zero)."""
    x0 = x0.detach().float()
    x_t, s, _ = _noised(x0, s_min, s_max, shift, generator)
    t = 1000.0 * s
    sb = s.view(-1, 1, 1, 1, 1)
    v_real = teacher(x_t, t, text, causal=False).float()
    if guidance_scale != 1.0:
        if negative_text is None:
            raise ValueError("guidance_scale != 1 needs a negative text embedding")
        v_neg = teacher(x_t, t, negative_text, causal=False).float()
        v_real = v_neg + guidance_scale * (v_real - v_neg)
    x0_real = x_t - sb * v_real
    x0_fake = x_t - sb * critic(x_t, t, text, causal=False).float()
    normalizer = (x0 - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-8)
    return (x0_fake - x0_real) / normalizer


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x0, (x0 - grad).detach()): a surrogate whose gradient w.r.t. x0 is grad / x0.numel()."""
    x0 = x0.float()
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def critic_loss(
    critic: nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    *,
    s_min: float = 0.02,
    s_max: float = 0.98,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flow-matching loss of the critic (bidirectional) on detached generator samples, at noise levels drawn as
    the DMD step draws them (the critic is only ever asked there)."""
    x0 = x0.detach().float()
    x_t, s, noise = _noised(x0, s_min, s_max, shift, generator)
    pred = critic(x_t, 1000.0 * s, text, causal=False)
    return F.mse_loss(pred.float(), noise - x0)


@dataclass(frozen=True)
class DMDConfig:
    """DMD settings. The student samples with `steps` steps at `shift` (`few_step_sigmas`): 4 at shift 5 for the
    distilled model, 2 for the 4 -> 2-step LoRA. Optimizer defaults are Self-Forcing's (AdamW, betas (0, 0.999),
    weight decay 0.01, generator lr 2e-6, critic lr 4e-7, gradient norm clipped at 10). `critic_updates` critic
    steps follow each generator step. With `lora`, only a LoRA on the generator is trained."""

    chunk_frames: int = 8
    steps: int = 4
    shift: float = 5.0
    guidance_scale: float = 1.0
    critic_updates: int = 1
    generator_lr: float = 2e-6
    critic_lr: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0
    s_min: float = 0.02
    s_max: float = 0.98
    score_shift: float = 5.0
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        for name in ("chunk_frames", "steps", "critic_updates"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("shift", "generator_lr", "critic_lr", "max_grad_norm", "score_shift"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0.0 < self.s_min < self.s_max <= 1.0:
            raise ConfigError(f"need 0 < s_min < s_max <= 1, got s_min {self.s_min}, s_max {self.s_max}")
        if not math.isfinite(self.guidance_scale):
            raise ConfigError(f"guidance_scale must be finite, got {self.guidance_scale}")

    @property
    def sigmas(self) -> list[float]:
        """The student's noise levels (t = 1000 sigma), e.g. 4 steps at shift 5: 1, 0.9375, 0.8333, 0.625."""
        return few_step_sigmas(self.steps, self.shift)


class DMDTrainer:
    """Generator + frozen teacher + critic, with one AdamW each; `step` is one generator update followed by
    `critic_updates` critic updates. Deterministic: all noise comes from the `rng` passed to `step`.

    `critic` defaults to a copy of the teacher (DMD's initialization); pass one to use another (e.g. with its own
    LoRA: only parameters with requires_grad are optimized). With `config.lora` the generator gets a LoRA
    (`inject_lora`, base frozen) and only the adapter trains; `save_lora` writes just the adapter.
    """

    def __init__(
        self,
        generator: CausalWanTransformer,
        teacher: nn.Module,
        config: DMDConfig = DMDConfig(),
        critic: nn.Module | None = None,
    ) -> None:
        if critic is teacher or generator is teacher or critic is generator:
            raise ValueError("generator, teacher and critic must be distinct modules")
        self.cfg = config
        if config.lora is not None:
            inject_lora(generator, config.lora)
        self.generator = generator.train()
        self.critic = (critic if critic is not None else copy.deepcopy(teacher).requires_grad_(True)).train()
        self.teacher = teacher.eval().requires_grad_(False)
        self.generator_opt = self._adamw(self.generator, config.generator_lr, "generator")
        self.critic_opt = self._adamw(self.critic, config.critic_lr, "critic")

    def _adamw(self, model: nn.Module, lr: float, name: str) -> torch.optim.AdamW:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"the {name} has no trainable parameters")
        return torch.optim.AdamW(params, lr=lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)

    def sample(self, shape: Sequence[int], text: torch.Tensor, rng: torch.Generator | None,
               grad: bool = False) -> torch.Tensor:
        """A generator rollout from fresh noise of `shape` (drawn from `rng`, then re-noising noise)."""
        like = next(self.generator.parameters())
        noise = _randn(shape, like, rng)
        return few_step_rollout(self.generator, noise, text, chunk_frames=self.cfg.chunk_frames,
                                sigmas=self.cfg.sigmas, renoise_generator=rng, grad_last_step=grad)

    def _update(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
        return norm.item()

    def critic_step(self, samples: torch.Tensor, text: torch.Tensor, rng: torch.Generator | None) -> float:
        """One critic update on (detached) generator samples; returns the loss."""
        cfg = self.cfg
        loss = critic_loss(self.critic, samples, text, s_min=cfg.s_min, s_max=cfg.s_max, shift=cfg.score_shift,
                           generator=rng)
        self._update(loss, self.critic_opt)
        return loss.item()

    def step(
        self,
        latent_batch: torch.Tensor,
        text: torch.Tensor,
        negative_text: torch.Tensor | None,
        rng: torch.Generator | None,
    ) -> dict[str, float]:
        """One generator update, then `critic_updates` critic updates (the first on this step's rollout, as DMD2
        does; the others on fresh no-grad rollouts). DMD needs no data: only `latent_batch`'s shape is used.
        Returns generator_loss, generator_grad_norm, critic_loss (mean over the critic updates)."""
        cfg = self.cfg
        if cfg.guidance_scale != 1.0 and negative_text is None:
            raise ValueError("guidance_scale != 1 needs a negative text embedding")
        shape = latent_batch.shape
        x0 = self.sample(shape, text, rng, grad=True)
        grad = dmd_gradient(self.teacher, self.critic, x0, text, negative_text, guidance_scale=cfg.guidance_scale,
                            s_min=cfg.s_min, s_max=cfg.s_max, shift=cfg.score_shift, generator=rng)
        loss = dmd_loss(x0, grad)
        grad_norm = self._update(loss, self.generator_opt)
        critic_losses = [self.critic_step(x0, text, rng)]
        for _ in range(cfg.critic_updates - 1):
            critic_losses.append(self.critic_step(self.sample(shape, text, rng), text, rng))
        return {"generator_loss": loss.item(), "generator_grad_norm": grad_norm,
                "critic_loss": sum(critic_losses) / len(critic_losses)}

    def save_lora(self, path: str | Path) -> None:
        """Write the generator's adapter alone (`longstream.model.lora` format)."""
        if self.cfg.lora is None:
            raise ValueError("this DMD run trains the whole generator, not a LoRA")
        save_lora(self.generator, path, self.cfg.lora)
