"""Samplers: the few-step schedule and diffusers' flow-matching schedulers, against exact flow math."""

import pytest
import torch

from longstream.pipeline.schedule import FewStepSampler, SchedulerSampler, few_step_sigmas


def test_few_step_timesteps_match_the_distilled_schedule():
    # Self-Forcing / LongLive: steps [1000, 750, 500, 250] warped through shift 5
    assert [round(1000 * s, 4) for s in few_step_sigmas(4, 5.0)] == [1000.0, 937.5, 833.3333, 625.0]
    assert [round(1000 * s, 4) for s in few_step_sigmas(2, 5.0)] == [1000.0, 833.3333]
    with pytest.raises(ValueError):
        few_step_sigmas(0, 5.0)


def oracle_velocity(x0):
    """The exact velocity field of a point target: v = (x_t - x0) / sigma."""
    def velocity(x, t):
        return (x - x0) / (t / 1000.0)
    return velocity


@pytest.mark.parametrize("sampler", [FewStepSampler(4, 5.0), FewStepSampler(2, 3.0)])
def test_few_step_sampler_recovers_the_target_under_an_exact_velocity(sampler):
    x0 = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    out = sampler.sample(oracle_velocity(x0), noise, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-10)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_scheduler_sampler_follows_a_straight_flow(solver):
    """On the straight path x_t = (1 - s) x0 + s noise the velocity noise - x0 is exact at every t."""
    x0 = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    seen = []

    def velocity(x, t):
        seen.append(t)
        return noise - x0

    out = SchedulerSampler(12, 5.0, solver).sample(velocity, noise, None)
    assert len(seen) == 12 and seen[0] > 900 and seen == sorted(seen, reverse=True)
    assert torch.allclose(out, x0, atol=1e-5)


def test_few_step_sampler_renoises_with_the_generator():
    """A velocity that ignores x gives x0 = x_t - sigma v; the re-noised input at step 2 is
    (1 - s1) x0 + s1 * eps with eps the generator's next draw."""
    sampler = FewStepSampler(2, 5.0)
    s0, s1 = sampler.sigmas
    seen = []

    def velocity(x, t):
        seen.append((x.clone(), t))
        return torch.ones_like(x)

    noise = torch.randn(2, 3)
    gen = torch.Generator().manual_seed(7)
    out = sampler.sample(velocity, noise, gen)
    eps = torch.randn((2, 3), generator=torch.Generator().manual_seed(7))
    x0_first = noise - s0
    assert torch.allclose(seen[1][0], (1 - s1) * x0_first + s1 * eps)
    assert seen[1][1] == pytest.approx(1000 * s1)
    assert torch.allclose(out, seen[1][0] - s1)
