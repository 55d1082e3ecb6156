"""One-Forcing's losses (DESIGN §3) as pure functions of tensors and callables.

The generator's update is expressed as a gradient *on the sample* x0: the DMD term comes from the
teacher and the critic's scores, the GAN term from the critic's heads, and the worker applies
`x0.backward((dmd_gradient + gan_gradient).to(x0.dtype))` (the DMD term is fp32, so the sum is formed in
fp32 and cast once). That is what lets the teacher and critic live behind actor boundaries: each returns
a tensor shaped like x0. Every `*_gradient` here is the autograd gradient of the matching `*_loss`
(tests check this). The critic's regularisers are finite-difference R1 (real) and R2 (fake) penalties.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.flow import add_noise

GanKind = Literal["nonsaturating", "relativistic"]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # noisy sample -> (B,) logits


def frame_mask(x0: torch.Tensor, first_frame: int) -> torch.Tensor:
    """1 on frames >= first_frame (those whose generating forward carried grad), broadcastable to x0."""
    mask = torch.zeros(1, 1, x0.shape[2], 1, 1, dtype=torch.float32, device=x0.device)
    mask[:, :, first_frame:] = 1.0
    return mask


def dmd_direction(x0: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """(x0_fake - x0_real) / max(mean|x0 - x0_real|, 1e-6), the normaliser per sample over (C, F, H, W),
    then nan_to_num; always fp32 whatever the inputs' dtype.

    The clamp matters: an unclamped zero normaliser (x0 == x0_real) gives inf, which nan_to_num turns
    into ~3.4e38, and the step's gradient clipping then scales every other gradient to zero.
    """
    x0, x0_fake, x0_real = x0.float(), x0_fake.float(), x0_real.float()
    normaliser = (x0 - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-6)
    return torch.nan_to_num((x0_fake - x0_real) / normaliser)


def dmd_loss(x0: torch.Tensor, direction: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
    """0.5 * mean((x0 - sg(x0 - direction))^2) over the frames that carry grad, in fp32."""
    mask = frame_mask(x0, first_frame)
    target = (x0.float() - direction).detach()
    squared = (x0.float() - target) ** 2 * mask
    return 0.5 * squared.sum() / (mask.sum() * x0[:, :, :1].numel())


def dmd_gradient(x0: torch.Tensor, direction: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
    """d dmd_loss / d x0 in closed form: the direction on grad frames, divided by their element count.

    fp32, not x0's dtype: the combined sample gradient is summed in fp32 and the caller casts once, at
    backward time, so a bf16 student does not round each term separately.
    """
    mask = frame_mask(x0, first_frame)
    return direction.float() * mask / (mask.sum() * x0[:, :, :1].numel())


def real_x0(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """The teacher's CFG real score in x0 space: x0_cond + g (x0_cond - x0_uncond)."""
    return x0_cond + guidance * (x0_cond - x0_uncond)


def flow_loss(v_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the critic on generated samples: mean((v_pred - (e - x0))^2), fp32."""
    return ((v_pred.float() - (noise.float() - x0.float())) ** 2).mean()


def gan_generator_losses(
    fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None, kind: GanKind = "nonsaturating"
) -> torch.Tensor:
    """Per sample (B,): non-saturating softplus(-D(fake)); relativistic softplus(-(D(fake) - D(real)))."""
    if kind == "nonsaturating":
        return F.softplus(-fake_logits.float())
    if real_logits is None:
        raise ValueError("the relativistic GAN loss needs the real logits")
    return F.softplus(-(fake_logits.float() - real_logits.float()))


def gan_generator_loss(
    fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None, kind: GanKind = "nonsaturating"
) -> torch.Tensor:
    """The generator's GAN loss: the batch mean of `gan_generator_losses`."""
    return gan_generator_losses(fake_logits, real_logits, kind).mean()


def gan_discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: GanKind = "nonsaturating"
) -> torch.Tensor:
    """Non-saturating: mean softplus(-D(real)) + softplus(D(fake)). Relativistic: softplus(-(D(real) - D(fake)))."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "nonsaturating":
        return (F.softplus(-real) + F.softplus(fake)).mean()
    return F.softplus(-(real - fake)).mean()


def finite_difference_penalty(
    logits: LogitsFn,
    x: torch.Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
    divide_by_sigma: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean(d^2) with d = D(x + sigma e) - D(x), or d / sigma when `divide_by_sigma`.

    A gradient penalty without double backprop: for small sigma, E[(d / sigma)^2] ~ |grad_x D|^2.
    `e` is `noise` when given (training draws it per sample, for determinism), else N(0, I) from
    `generator`. One-Forcing uses both forms: see r1_penalty and r2_penalty.
    """
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    change = logits(x + sigma * noise).float() - logits(x).float()
    if divide_by_sigma:
        change = change / sigma
    return (change**2).mean()


def r1_penalty(logits: LogitsFn, x_real: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """R1 on (noised) real samples as One-Forcing has it: mean((D(x_r + sigma e) - D(x_r))^2), *not*
    divided by sigma (the weight absorbs the sigma^2). The critic loss adds `r1_weight * r1_penalty`."""
    return finite_difference_penalty(logits, x_real, sigma, noise=noise)


def r2_penalty(logits: LogitsFn, x_fake: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """R2 on (noised) fake samples as One-Forcing has it: mean(((D(x_f + sigma e) - D(x_f)) / sigma)^2),
    divided by sigma. The 0.5 is the caller's: the critic loss adds `0.5 * r2_weight * r2_penalty`."""
    return finite_difference_penalty(logits, x_fake, sigma, divide_by_sigma=True, noise=noise)


def gan_generator_gradient(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timestep: torch.Tensor,
    logits: LogitsFn,
    weight: float,
    real_logits: torch.Tensor | None = None,
    kind: GanKind = "nonsaturating",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d [weight * gan_generator_loss(D(noise(x0, t)))] / d x0, the unweighted loss of each sample (B,)).

    Differentiates with respect to the sample only (torch.autograd.grad), so no parameter's `.grad` is
    touched even through a trainable critic; a ZeRO-wrapped critic must still be frozen
    (`requires_grad_(False)`), because its gradient hooks fire during the backward (DESIGN §4).
    """
    sample = x0.detach().requires_grad_(True)
    with torch.enable_grad():
        per_sample = gan_generator_losses(logits(add_noise(sample, noise, timestep)), real_logits, kind)
        (grad,) = torch.autograd.grad(weight * per_sample.mean(), sample)
    return grad, per_sample.detach()


def regression_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """ODE-regression init (CausVid): mean((x0_pred - x0_target)^2) in fp32, the student's one-step x0
    from a trajectory state against the teacher ODE's clean end."""
    return ((x0_pred.float() - x0_target.float()) ** 2).mean()
