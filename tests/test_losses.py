"""Losses against hand computation, autograd, gradcheck and a closed-form DMD toy."""

import pytest
import torch

from pipeline.flow import add_noise, sample_timesteps
from pipeline.losses import (
    dmd_direction, dmd_gradient, dmd_loss, finite_difference_penalty, flow_loss, gan_discriminator_loss,
    gan_generator_gradient, gan_generator_loss, real_x0,
)
from pipeline.models.discriminator import GANHeads


def test_dmd_direction_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 2, 1, 1, 1)
    fake = torch.tensor([[0.5, 1.0], [1.0, 1.0]]).view(2, 2, 1, 1, 1)
    real = torch.tensor([[0.0, 0.0], [2.0, -2.0]]).view(2, 2, 1, 1, 1)
    # sample 0: normaliser mean(|1|, |2|) = 1.5; sample 1: mean(|-2|, |2|) = 2
    want = torch.tensor([[0.5 / 1.5, 1.0 / 1.5], [-1.0 / 2.0, 3.0 / 2.0]]).view(2, 2, 1, 1, 1)
    assert torch.allclose(dmd_direction(x0, fake, real), want)
    # a sample equal to the real score has a zero normaliser: the direction stays finite
    assert torch.isfinite(dmd_direction(real, fake, real)).all()


def test_real_score_cfg():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert real_x0(cond, uncond, 5.0).item() == 3.0 + 5.0 * 2.0


@pytest.mark.parametrize("first_frame", [0, 2])
def test_dmd_gradient_is_autograd_of_dmd_loss(first_frame):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 2, 2, generator=g, requires_grad=True)
    direction = dmd_direction(x0.detach(), torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g))
    (autograd,) = torch.autograd.grad(dmd_loss(x0, direction, first_frame), x0)
    closed = dmd_gradient(x0, direction, first_frame)
    assert torch.allclose(autograd, closed, atol=1e-7)
    assert not closed[:, :, :first_frame].any()
    # gradient = direction / (number of grad elements)
    count = 2 * 3 * (4 - first_frame) * 2 * 2
    assert torch.allclose(closed[:, :, first_frame:], direction[:, :, first_frame:] / count)


def test_flow_loss_by_hand():
    v = torch.tensor([1.0, 2.0]); e = torch.tensor([0.5, 0.5]); x0 = torch.tensor([0.0, -1.0])
    assert flow_loss(v, e, x0).item() == pytest.approx(((1 - 0.5) ** 2 + (2 - 1.5) ** 2) / 2)


def _small_heads():
    torch.manual_seed(0)
    return GANHeads(feature_dim=8, num_taps=2, num_registers=2, num_heads=2, ffn_dim=16, hidden_dim=8,
                    timestep_conditioning=True, freq_dim=8).double()


@pytest.mark.parametrize("kind", ["nonsaturating", "relativistic"])
def test_gan_losses_pass_gradcheck_through_heads(kind):
    heads = _small_heads()
    g = torch.Generator().manual_seed(1)
    real = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fake = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t = torch.tensor([100.0, 700.0], dtype=torch.float64)

    def disc(r0, r1, f0, f1):
        return gan_discriminator_loss(heads([r0, r1], t).double(), heads([f0, f1], t).double(), kind).double()

    def gen(f0, f1, r0, r1):
        return gan_generator_loss(heads([f0, f1], t).double(), heads([r0, r1], t).double(), kind).double()

    # the losses compute in fp32 internally; gradcheck the float64 head with fp64-tolerant settings
    assert torch.autograd.gradcheck(lambda *a: disc(*a), (*real, *fake), eps=1e-4, atol=1e-3, rtol=1e-2)
    assert torch.autograd.gradcheck(lambda *a: gen(*a), (*fake, *real), eps=1e-4, atol=1e-3, rtol=1e-2)


def test_gan_loss_values_by_hand():
    sp = torch.nn.functional.softplus
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    assert gan_generator_loss(fake).item() == pytest.approx(sp(-fake).mean().item())
    assert gan_discriminator_loss(real, fake).item() == pytest.approx((sp(-real) + sp(fake)).mean().item())
    assert gan_generator_loss(fake, real, "relativistic").item() == pytest.approx(sp(real - fake).mean().item())
    assert gan_discriminator_loss(real, fake, "relativistic").item() == pytest.approx(sp(fake - real).mean().item())


def test_gan_generator_gradient_matches_autograd_and_leaves_critic_untouched():
    heads = _small_heads().float()
    proj = torch.nn.Linear(4, 8)
    for p in [*heads.parameters(), *proj.parameters()]:
        p.requires_grad_(False)  # frozen critic, as in the generator step

    def logits(x_t):  # (B, C=4, F, H, W) -> tokens (B, F*H*W, 4) -> features
        tokens = proj(x_t.flatten(2).transpose(1, 2))
        return heads([tokens, tokens], torch.full((x_t.shape[0],), 400.0))

    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 3, 2, 2, generator=g, requires_grad=True)
    noise, t = torch.randn(2, 4, 3, 2, 2, generator=g), torch.tensor([300.0, 600.0])
    grad, loss = gan_generator_gradient(x0, noise, t, logits, weight=0.03)
    (want,) = torch.autograd.grad(0.03 * gan_generator_loss(logits(add_noise(x0, noise, t))), x0)
    assert torch.allclose(grad, want, atol=1e-7) and grad.abs().max() > 0
    assert loss.item() == pytest.approx(gan_generator_loss(logits(add_noise(x0, noise, t))).item())
    assert all(p.grad is None for p in heads.parameters())


def test_combined_sample_gradient_equals_backward_of_summed_losses():
    """x0.backward(dmd_gradient + gan_gradient) == (dmd_loss + w * gan_loss).backward() for the generator."""
    gen = torch.nn.Linear(3, 3)
    z = torch.randn(2, 3)
    w_gan = 0.03
    proj = torch.nn.Linear(3, 1).requires_grad_(False)

    def logits(x_t):
        return proj(x_t.flatten(1)).squeeze(1)

    def sample():
        return gen(z).view(2, 3, 1, 1, 1)

    fake, real = torch.randn(2, 3, 1, 1, 1), torch.randn(2, 3, 1, 1, 1)
    noise, t = torch.randn(2, 3, 1, 1, 1), torch.tensor([500.0, 500.0])
    x0 = sample()
    direction = dmd_direction(x0.detach(), fake, real)
    gan_grad, _ = gan_generator_gradient(x0, noise, t, logits, w_gan)
    x0.backward(dmd_gradient(x0, direction) + gan_grad)
    by_sample = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad()
    x0 = sample()
    (dmd_loss(x0, direction) + w_gan * gan_generator_loss(logits(add_noise(x0, noise, t)))).backward()
    for a, b in zip(by_sample, (p.grad for p in gen.parameters())):
        assert torch.allclose(a, b, atol=1e-7)


def test_finite_difference_penalty_closed_form_for_linear_discriminator():
    w = torch.tensor([0.5, -2.0, 1.0])
    x = torch.randn(50000, 3, generator=torch.Generator().manual_seed(0))
    penalty = finite_difference_penalty(lambda y: y @ w, x, sigma=0.1, generator=torch.Generator().manual_seed(1))
    assert penalty.item() == pytest.approx(0.01 * (w @ w).item(), rel=0.03)  # E[(sigma w.e)^2]


def _posterior_x0(x_t, s, mean, cov):
    """E[x0 | x_t] for x0 ~ N(mean, cov), x_t = (1-s) x0 + s e (closed form, batched over samples)."""
    eye = torch.eye(2, dtype=torch.float64)
    a = (1 - s).view(-1, 1, 1)
    marginal = a**2 * cov + (s.view(-1, 1, 1) ** 2) * eye
    gain = a * cov @ torch.linalg.inv(marginal)
    centred = (x_t - (1 - s).view(-1, 1) * mean).unsqueeze(-1)
    return mean + (gain @ centred).squeeze(-1)


def test_dmd_moves_one_step_gaussian_generator_to_target():
    """2-D toy with analytic scores: generator x = b + A z. The fake score is the exact posterior mean
    under the generator's current law N(b, A A^T) (a perfect critic); the real score the target's.
    A few hundred DMD steps must bring mean and covariance to the target's."""
    torch.manual_seed(0)
    target_mean = torch.tensor([2.0, -1.0], dtype=torch.float64)
    target_cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    A = torch.nn.Parameter(torch.eye(2, dtype=torch.float64) * 0.3)
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.Adam([A, b], lr=0.02)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        z = torch.randn(512, 2, generator=g, dtype=torch.float64)
        x0 = b + z @ A.T
        t = sample_timesteps(512, g, shift=1.0, min_t=20, max_t=980).double()
        s = t / 1000
        e = torch.randn(512, 2, generator=g, dtype=torch.float64)
        x_t = (1 - s)[:, None] * x0.detach() + s[:, None] * e
        with torch.no_grad():
            fake = _posterior_x0(x_t, s, b, A @ A.T)
            real = _posterior_x0(x_t, s, target_mean, target_cov)
        shape = (512, 2, 1, 1, 1)
        direction = dmd_direction(x0.detach().view(shape), fake.view(shape), real.view(shape))
        opt.zero_grad()
        dmd_loss(x0.view(shape), direction).backward()
        opt.step()
    assert torch.allclose(b.detach(), target_mean, atol=0.05)
    assert torch.allclose((A @ A.T).detach(), target_cov, atol=0.08)
