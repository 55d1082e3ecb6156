"""Losses against hand computation, autograd, closed forms, a few discriminator steps and a DMD toy."""

import pytest
import torch

from pipeline.flow import add_noise, sample_timesteps
from pipeline.losses import (
    dmd_direction, dmd_gradient, dmd_loss, finite_difference_penalty, flow_loss, gan_discriminator_loss,
    gan_generator_gradient, gan_generator_loss, r1_penalty, r2_penalty, real_x0,
)
from pipeline.models.discriminator import GANHeads


def test_dmd_direction_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 2, 1, 1, 1)
    fake = torch.tensor([[0.5, 1.0], [1.0, 1.0]]).view(2, 2, 1, 1, 1)
    real = torch.tensor([[0.0, 0.0], [2.0, -2.0]]).view(2, 2, 1, 1, 1)
    # sample 0: normaliser mean(|1|, |2|) = 1.5; sample 1: mean(|-2|, |2|) = 2
    want = torch.tensor([[0.5 / 1.5, 1.0 / 1.5], [-1.0 / 2.0, 3.0 / 2.0]]).view(2, 2, 1, 1, 1)
    assert torch.allclose(dmd_direction(x0, fake, real), want)


def test_dmd_zero_normaliser_is_clamped_not_infinite():
    """x0 == x0_real: the normaliser is clamped to 1e-6, so the direction is (fake - real) * 1e6, not the
    ~3.4e38 that nan_to_num makes of inf (which would zero the step through gradient clipping)."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    x0 = real.clone()
    x0[1] += 0.5  # the second sample has a normaliser of exactly 0.5
    direction = dmd_direction(x0, fake, real)
    assert torch.allclose(direction[0], (fake[0] - real[0]) / 1e-6)
    assert torch.allclose(direction[1], (fake[1] - real[1]) / 0.5)
    assert direction.abs().max() < 1e8


def test_dmd_direction_and_gradient_stay_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    x0, fake, real = (torch.randn(2, 3, 4, 2, 2, generator=g).bfloat16() for _ in range(3))
    direction = dmd_direction(x0, fake, real)
    assert direction.dtype == torch.float32
    assert torch.equal(direction, dmd_direction(x0.float(), fake.float(), real.float()))
    grad = dmd_gradient(x0, direction, first_frame=1)
    assert grad.dtype == torch.float32
    assert torch.equal(grad, dmd_gradient(x0.float(), direction, first_frame=1))
    # not rounded through bf16 on the way: the exact fp32 quotient survives
    count = 2 * 3 * 3 * 2 * 2
    assert torch.equal(grad[:, :, 1:], direction[:, :, 1:] / count)
    assert not torch.equal(grad, grad.bfloat16().float())


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
    return GANHeads(feature_dim=8, num_taps=2, num_registers=1, num_heads=2, ffn_dim=16,
                    timestep_conditioning=True, freq_dim=8)


def _separable(n, dim, gen, shift=1.0):
    """Real around +shift*mu, fake around -shift*mu: a linear discriminator can separate them."""
    mu = torch.tensor([1.0, -0.8, 0.6, -1.2])[:dim] * shift
    return mu + 0.5 * torch.randn(n, dim, generator=gen), -mu + 0.5 * torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("kind", ["nonsaturating", "relativistic"])
def test_discriminator_steps_raise_real_and_lower_fake_logits(kind):
    """Adam on gan_discriminator_loss must push D(real) up and D(fake) down. With a linear D and data
    symmetric about 0 this holds for the relativistic loss too (its bias gets no gradient)."""
    g = torch.Generator().manual_seed(0)
    real, fake = _separable(128, 4, g)
    torch.manual_seed(0)
    disc = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(disc.parameters(), lr=0.05)

    def logits(x):
        return disc(x).squeeze(1)

    with torch.no_grad():
        real0, fake0 = logits(real).mean().item(), logits(fake).mean().item()
        loss0 = gan_discriminator_loss(logits(real), logits(fake), kind).item()
    for _ in range(20):
        opt.zero_grad()
        gan_discriminator_loss(logits(real), logits(fake), kind).backward()
        opt.step()
    with torch.no_grad():
        assert logits(real).mean().item() > real0 + 1.0
        assert logits(fake).mean().item() < fake0 - 1.0
        assert gan_discriminator_loss(logits(real), logits(fake), kind).item() < 0.5 * loss0
        assert (logits(real) > logits(fake)).float().mean() > 0.95
        # the generator's loss on the same logits moves the other way
        assert gan_generator_loss(logits(fake), logits(real), kind).item() > loss0


@pytest.mark.parametrize("kind", ["nonsaturating", "relativistic"])
def test_gan_heads_learn_to_separate_fixed_features(kind):
    """The real heads, trained on fixed token features (real tokens shifted one way, fake the other)."""
    heads = _small_heads()
    g = torch.Generator().manual_seed(3)
    shift = torch.randn(8, generator=g)
    real = [torch.randn(16, 6, 8, generator=g) + shift for _ in range(2)]
    fake = [torch.randn(16, 6, 8, generator=g) - shift for _ in range(2)]
    t = torch.full((16,), 500.0)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    with torch.no_grad():
        gap0 = (heads(real, t).mean() - heads(fake, t).mean()).item()
        loss0 = gan_discriminator_loss(heads(real, t), heads(fake, t), kind).item()
    for _ in range(30):
        opt.zero_grad()
        gan_discriminator_loss(heads(real, t), heads(fake, t), kind).backward()
        opt.step()
    with torch.no_grad():
        real_logits, fake_logits = heads(real, t), heads(fake, t)
        assert (real_logits.mean() - fake_logits.mean()).item() > gap0 + 1.0
        assert gan_discriminator_loss(real_logits, fake_logits, kind).item() < 0.5 * loss0
        assert (real_logits > fake_logits).all()


def test_gan_loss_values_by_hand():
    sp = torch.nn.functional.softplus
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    assert gan_generator_loss(fake).item() == pytest.approx(sp(-fake).mean().item())
    assert gan_discriminator_loss(real, fake).item() == pytest.approx((sp(-real) + sp(fake)).mean().item())
    assert gan_generator_loss(fake, real, "relativistic").item() == pytest.approx(sp(real - fake).mean().item())
    assert gan_discriminator_loss(real, fake, "relativistic").item() == pytest.approx(sp(fake - real).mean().item())


def test_gan_generator_gradient_matches_autograd_and_leaves_a_trainable_critic_untouched():
    """The critic is left trainable on purpose: gan_generator_gradient differentiates with respect to the
    sample only, so no parameter may receive a .grad even though every one could."""
    heads = _small_heads()
    proj = torch.nn.Linear(4, 8)
    params = [*heads.parameters(), *proj.parameters()]
    assert all(p.requires_grad for p in params)

    def logits(x_t):  # (B, C=4, F, H, W) -> tokens (B, F*H*W, 8) -> features
        tokens = proj(x_t.flatten(2).transpose(1, 2))
        return heads([tokens, tokens], torch.full((x_t.shape[0],), 400.0))

    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 3, 2, 2, generator=g, requires_grad=True)
    noise, t = torch.randn(2, 4, 3, 2, 2, generator=g), torch.tensor([300.0, 600.0])
    grad, loss = gan_generator_gradient(x0, noise, t, logits, weight=0.03)
    assert all(p.grad is None for p in params)
    assert x0.grad is None
    (want,) = torch.autograd.grad(0.03 * gan_generator_loss(logits(add_noise(x0, noise, t))), x0)
    assert torch.allclose(grad, want, atol=1e-7) and grad.abs().max() > 0
    assert loss.shape == (2,)
    assert loss.mean().item() == pytest.approx(gan_generator_loss(logits(add_noise(x0, noise, t))).item())
    # the relativistic form takes the real logits as constants
    real_logits = torch.tensor([0.3, -0.2])
    grad, _ = gan_generator_gradient(x0, noise, t, logits, 0.03, real_logits, "relativistic")
    (want,) = torch.autograd.grad(
        0.03 * gan_generator_loss(logits(add_noise(x0, noise, t)), real_logits, "relativistic"), x0
    )
    assert torch.allclose(grad, want, atol=1e-7)
    assert all(p.grad is None for p in params)


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


def test_r1_and_r2_closed_form_for_linear_discriminator():
    """D(x) = x.w, so D(x + sigma e) - D(x) = sigma e.w exactly: R1 = mean((sigma e.w)^2) (scales with
    sigma^2), R2 = mean((e.w)^2) (independent of sigma). Exact for the given e, and in expectation:
    E[R1] = sigma^2 |w|^2, E[R2] = |w|^2."""
    w = torch.tensor([0.5, -2.0, 1.0])
    x = torch.randn(50000, 3, generator=torch.Generator().manual_seed(0))
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def logits(y):
        return y @ w

    for sigma in (0.1, 0.01):
        r1, r2 = r1_penalty(logits, x, e, sigma), r2_penalty(logits, x, e, sigma)
        assert r1.item() == pytest.approx(((sigma * e @ w) ** 2).mean().item(), rel=1e-3)
        assert r2.item() == pytest.approx(((e @ w) ** 2).mean().item(), rel=1e-3)
        assert r1.item() == pytest.approx(sigma**2 * (w @ w).item(), rel=0.03)
        assert r2.item() == pytest.approx((w @ w).item(), rel=0.03)
    # the primitive: given noise or drawn from a generator; R1 undivided, R2 divided
    drawn = finite_difference_penalty(logits, x, 0.1, torch.Generator().manual_seed(1))
    assert drawn.item() == pytest.approx(r1_penalty(logits, x, e, 0.1).item())
    divided = finite_difference_penalty(logits, x, 0.1, torch.Generator().manual_seed(1), divide_by_sigma=True)
    assert divided.item() == pytest.approx(r2_penalty(logits, x, e, 0.1).item())


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
