"""Flow-matching helpers against closed forms."""

import math

import pytest
import torch

from pipeline.flow import (
    add_noise, classifier_free_guidance, euler_sample, sample_timesteps, sampling_timesteps,
    shift_noise_level, velocity_from_x0, warp_timesteps, x0_from_velocity,
)


def test_noise_velocity_round_trip_per_sample_and_per_frame():
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    for t in (torch.tensor([250.0, 900.0]), torch.rand(2, 4, generator=g) * 999 + 1):
        x_t = add_noise(x0, e, t)
        v = e - x0  # the flow-matching target
        assert torch.allclose(x0_from_velocity(x_t, v, t), x0, atol=1e-5)
        assert torch.allclose(velocity_from_x0(x_t, x0, t), v, atol=1e-4)
    assert torch.equal(add_noise(x0, e, 0.0), x0) and torch.equal(add_noise(x0, e, 1000.0), e)


def test_shift_and_warp_closed_form():
    assert shift_noise_level(0.5, 5.0) == pytest.approx(2.5 / 3.0)
    assert warp_timesteps([1000, 750, 500, 250], 5.0) == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0])
    steps = sampling_timesteps(4, 3.0)
    assert steps[0] == 1000.0 and steps[-1] == 0.0 and steps == sorted(steps, reverse=True)


def test_sample_timesteps_range_and_distribution():
    t = sample_timesteps(20000, torch.Generator().manual_seed(0), shift=5.0, min_t=20, max_t=980)
    assert t.min() >= 20 and t.max() <= 980
    # P(t <= 1000 * shift(u0)) = u0 for the unclamped part: at u0 = 0.5, t0 = 833.3
    assert (t <= 1000 * 2.5 / 3).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_cfg_formula():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert classifier_free_guidance(cond, uncond, 5.0).item() == 6.0  # uncond + 5 (cond - uncond)


def test_euler_with_exact_velocity_recovers_gaussian_target():
    """x0 ~ N(m, sd^2) per dimension: the exact flow velocity is (x_t - E[x0 | x_t]) / s, with
    E[x0 | x_t] = m + (1-s) sd^2 (x_t - (1-s) m) / ((1-s)^2 sd^2 + s^2). Integrating it from pure
    noise must give samples with mean m and std sd."""
    m, sd = 1.5, 0.4

    def velocity(x, t):
        s = (t / 1000.0).view(-1, *[1] * (x.ndim - 1)).double()
        x = x.double()
        posterior_mean = m + (1 - s) * sd**2 * (x - (1 - s) * m) / ((1 - s) ** 2 * sd**2 + s**2)
        return ((x - posterior_mean) / s).float()

    noise = torch.randn(20000, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    steps = sampling_timesteps(200, 1.0)
    x, kept = euler_sample(velocity, noise, steps, keep_at=[steps[0], steps[100]])
    assert x.mean().item() == pytest.approx(m, abs=0.02)
    assert x.std().item() == pytest.approx(sd, abs=0.02)
    assert torch.equal(kept[steps[0]], noise)
    # halfway (s = 0.5): marginal std sqrt(0.25 sd^2 + 0.25), mean 0.5 m
    assert kept[steps[100]].std().item() == pytest.approx(math.sqrt(0.25 * sd**2 + 0.25), abs=0.02)
    assert kept[steps[100]].mean().item() == pytest.approx(0.5 * m, abs=0.02)
