"""Wan2.1 flow matching: noise levels, x0 <-> velocity, timestep sampling and the teacher's ODE sampler.

Conventions (DESIGN §3): timestep t in [0, 1000], noise level s = t / 1000,
    x_t = (1 - s) x0 + s e,   v = e - x0,   x0 = x_t - s v.
Tensors are video latents (B, C, F, H, W); `t` is a scalar, (B,) per sample, or (B, F) per frame.
Pure functions of tensors: no I/O, no distributed state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> v


def shift_noise_level(s: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Wan's resolution shift: s -> k s / (1 + (k - 1) s); spends more steps at high noise for k > 1."""
    return shift * s / (1 + (shift - 1) * s)


def warp_timesteps(timesteps: Sequence[float], shift: float) -> list[float]:
    """A denoising step list given on the unshifted grid ([1000, 750, 500, 250]) mapped through the
    shift, as Self-Forcing's `warp_denoising_step` does (k = 5: [1000, 937.5, 833.3, 625])."""
    return [1000.0 * shift_noise_level(t / 1000.0, shift) for t in timesteps]


def _broadcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Noise level s = t / 1000 shaped to broadcast against `like` (B, C, F, H, W), in float64."""
    s = torch.as_tensor(t, dtype=torch.float64, device=like.device) / 1000.0
    if s.ndim == 0:
        return s
    if s.ndim == 1:  # per sample
        return s.view(-1, *([1] * (like.ndim - 1)))
    if s.ndim == 2:  # per frame: (B, F) -> (B, 1, F, 1, 1)
        return s[:, None, :, None, None]
    raise ValueError(f"timestep must be a scalar, (B,) or (B, F); got shape {tuple(s.shape)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    s = _broadcast(t, x0)
    return ((1 - s) * x0.double() + s * noise.double()).to(x0.dtype)


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t - s v, computed in float64 (at s close to 1 the two terms nearly cancel), returned in
    the wider of the two dtypes (a bf16 model's velocity on an fp32 sample gives an fp32 x0)."""
    return (x_t.double() - _broadcast(t, x_t) * v.double()).to(torch.promote_types(x_t.dtype, v.dtype))


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t - x0) / s; undefined at s = 0."""
    return ((x_t.double() - x0.double()) / _broadcast(t, x_t)).to(x0.dtype)


def sample_timesteps(
    batch: int,
    generator: torch.Generator,
    shift: float = 5.0,
    min_t: float = 20.0,
    max_t: float = 980.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One timestep per clip for score evaluation: u ~ U[0, 1), t = 1000 shift(u), clamped."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    t = 1000.0 * shift_noise_level(u, shift)
    return t.clamp(min_t, max_t).float().to(device)


def sampling_timesteps(num_steps: int, shift: float) -> list[float]:
    """Decreasing timesteps for a `num_steps` ODE solve, uniform in s then shifted, ending exactly at 0
    (so the last Euler step lands on the clean sample rather than leaving residual noise)."""
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return [float(1000.0 * shift_noise_level(s, shift)) for s in grid]


def schedule_through(timesteps: Sequence[float], through: Sequence[float]) -> list[float]:
    """`timesteps` (decreasing) with the points `through` inserted, so an ODE solve lands exactly on
    them (the trajectory states ODE-regression init trains on)."""
    return sorted({float(t) for t in timesteps} | {float(t) for t in through}, reverse=True)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale (cond - uncond). Wan's sampler uses scale = guide_scale (5.0); the DMD real score
    `x0_cond + g (x0_cond - x0_uncond)` is this with scale = 1 + g."""
    return uncond + scale * (cond - uncond)


def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    timesteps: Sequence[float],
    keep_at: Sequence[float] = (),
) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """Integrate dx/dt along `timesteps` (decreasing, last one typically 0) from x = noise.

    Returns the final sample and the states x_t at the timesteps in `keep_at` (trajectory points for
    ODE-regression init). A step from t_i to t_{i+1}: x <- x + (s_{i+1} - s_i) v(x, t_i).
    """
    x = noise
    kept: dict[float, torch.Tensor] = {}
    wanted = {float(t) for t in keep_at}
    batch = noise.shape[0]
    for t_now, t_next in zip(timesteps[:-1], timesteps[1:]):
        if float(t_now) in wanted:
            kept[float(t_now)] = x.clone()
        t_batch = torch.full((batch,), float(t_now), device=noise.device)
        v = velocity(x, t_batch)
        x = (x.double() + (t_next - t_now) / 1000.0 * v.double()).to(noise.dtype)
    if float(timesteps[-1]) in wanted:
        kept[float(timesteps[-1])] = x.clone()
    return x, kept


def guided_velocity(
    model: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor, scale: float
) -> VelocityFn:
    """A VelocityFn for a text-conditioned model `model(x, t, text) -> v` with classifier-free guidance.
    Cond and uncond run as one batch of 2B, as Wan's own sampler does."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
        v_cond, v_uncond = v.chunk(2)
        return classifier_free_guidance(v_cond, v_uncond, scale)

    return velocity
