"""Flow-matching sampling of one chunk.

Convention (Wan): x_t = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity v = noise - x0 at
timestep t = 1000 * sigma, so x0 = x_t - sigma * v. A timestep shift s warps sigma -> s*sigma / (1 + (s-1)*sigma).

- `FewStepSampler`: the schedule of distilled (DMD) generators: predict x0 at each of N shifted timesteps taken
  evenly in unshifted sigma (4 steps at shift 5: t = 1000, 937.5, 833.3, 625), re-noising x0 with fresh noise
  to the next timestep in between.
- `SchedulerSampler`: many-step sampling of a non-distilled model through diffusers' flow-matching schedulers
  (Euler or UniPC, with shift); classifier-free guidance is applied by the caller's velocity function.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def shift_sigma(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def few_step_sigmas(steps: int, shift: float) -> list[float]:
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return [shift_sigma(1 - i / steps, shift) for i in range(steps)]


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU by default) so that a seed gives the same video anywhere."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like)


class Sampler(Protocol):
    steps: int

    def sample(self, velocity: Velocity, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Denoise `noise` into a clean latent chunk."""


class FewStepSampler:
    def __init__(self, steps: int = 4, shift: float = 5.0) -> None:
        self.steps = steps
        self.sigmas = few_step_sigmas(steps, shift)

    def sample(self, velocity: Velocity, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = noise
        for i, sigma in enumerate(self.sigmas):
            x0 = x - sigma * velocity(x, 1000.0 * sigma)
            if i + 1 == len(self.sigmas):
                return x0
            nxt = self.sigmas[i + 1]
            x = (1 - nxt) * x0 + nxt * _randn(x0, generator)
        raise AssertionError("unreachable")


class SchedulerSampler:
    """Many-step sampling with diffusers' `FlowMatchEulerDiscreteScheduler` or `UniPCMultistepScheduler`."""

    def __init__(self, steps: int = 50, shift: float = 5.0, solver: str = "unipc") -> None:
        if solver not in ("unipc", "euler"):
            raise ValueError(f"unknown solver {solver!r}; choose unipc or euler")
        self.steps, self.shift, self.solver = steps, shift, solver

    def _scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        if self.solver == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift)
        return UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=self.shift
        )

    def sample(self, velocity: Velocity, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        scheduler = self._scheduler()  # stateful: a fresh one per chunk
        scheduler.set_timesteps(self.steps, device=noise.device)
        x = noise
        for t in scheduler.timesteps:
            v = velocity(x, float(t))
            x = scheduler.step(v, t, x, return_dict=False)[0]
        return x
