"""The critic: one trunk forward gives the fake score and the GAN logits; the heads match the paper's
formula computed by hand; a frozen critic gives gradients on the sample only."""

import math

import pytest
import torch

from pipeline.flow import add_noise
from pipeline.losses import gan_generator_gradient, gan_generator_loss
from pipeline.models.discriminator import Critic, GANHeads, RegisterTap, build_gan_heads
from tests.conftest import tiny_wan


def _critic(timestep_conditioning=False):
    trunk = tiny_wan(seed=1)
    torch.manual_seed(2)
    heads = build_gan_heads(trunk, [0, 1], num_registers=1, num_heads=2, ffn_dim=16,
                            timestep_conditioning=timestep_conditioning, freq_dim=16)
    return Critic(trunk, heads, [0, 1]).eval()


@torch.no_grad()
def test_one_forward_gives_score_and_logits_matching_separate_calls():
    critic = _critic(timestep_conditioning=True)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(3, 4, 2, 8, 8, generator=g), torch.tensor([100.0, 500.0, 900.0]), torch.randn(3, 5, 32, generator=g)
    v, logits = critic(x, t, text)
    assert logits.shape == (3,)
    assert torch.equal(v, critic.trunk(x, t, text).sample)
    features = critic.trunk(x, t, text, feature_layers=(0, 1)).features
    assert torch.equal(logits, critic.heads(features, t))
    # the timestep conditions the logits
    assert not torch.allclose(critic.heads(features, t), critic.heads(features, t.flip(0)))
    v_only, none = critic(x, t, text, with_logits=False)
    assert none is None and torch.equal(v_only, v)


@torch.no_grad()
def test_logits_alone_stop_at_the_last_tap_and_equal_the_whole_forwards():
    """A critic tapped after its first of three blocks: `logits` runs that block only (the others and
    the velocity head feed nothing the logits read) and gives the whole forward's logits exactly."""
    trunk = tiny_wan(seed=1, num_layers=3)
    torch.manual_seed(2)
    critic = Critic(trunk, build_gan_heads(trunk, [0], num_registers=1, num_heads=2, ffn_dim=16), [0]).eval()
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 2, 8, 8, generator=g), torch.tensor([300.0, 600.0]), torch.randn(2, 5, 32, generator=g)
    _, whole = critic(x, t, text)
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
             for name, m in [("block 1", trunk.blocks[1]), ("block 2", trunk.blocks[2]), ("head", trunk.proj_out)]]
    alone = critic.logits(x, t, text)
    for hook in hooks:
        hook.remove()
    assert ran == [] and torch.equal(alone, whole)
    with pytest.raises(ValueError, match="features_only needs feature_layers"):
        trunk(x, t, text, features_only=True)


def test_logits_depend_on_every_tap_and_train_the_trunk():
    critic = _critic()
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 2, 8, 8, generator=g), torch.tensor([300.0, 600.0]), torch.randn(2, 5, 32, generator=g)
    critic.logits(x, t, text).sum().backward()
    assert critic.trunk.blocks[0].attn1.to_q.weight.grad.abs().max() > 0
    assert all(tap.registers.grad.abs().max() > 0 for tap in critic.heads.taps)


def test_bad_layers_are_rejected():
    trunk = tiny_wan()
    with pytest.raises(ValueError, match="feature layer 5"):
        Critic(trunk, build_gan_heads(trunk, [5], num_heads=2), [5])


def _rms_norm(x, weight):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _layer_norm(x, eps, weight=None, bias=None):
    centred = x - x.mean(-1, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _tap_by_hand(tap: RegisterTap, tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """tok = r + W_o MHA(q = RMSNorm(W_q r), k = RMSNorm(W_k LN(x)), v = W_v LN(x)), r = RMSNorm(register);
    out = tok + FFN(LN_noaffine(tok)). Explicit per-sample, per-head matmuls and softmax."""
    out = []
    for x in tokens:  # (L, D)
        r = _rms_norm(tap.registers, tap.norm_registers.weight)  # (R, D)
        ctx = _layer_norm(x, 1e-6, tap.norm_tokens.weight, tap.norm_tokens.bias)
        q = _rms_norm(_linear(r, tap.to_q), tap.norm_q.weight)
        k = _rms_norm(_linear(ctx, tap.to_k), tap.norm_k.weight)
        v = _linear(ctx, tap.to_v)
        d = x.shape[-1] // num_heads
        heads = []
        for h in range(num_heads):
            cols = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d), dim=-1)  # (R, L)
            heads.append(weights @ v[:, cols])
        tok = r + _linear(torch.cat(heads, dim=-1), tap.to_out)
        hidden = _gelu_tanh(_linear(_layer_norm(tok, 1e-6), tap.ffn[0]))
        out.append(tok + _linear(hidden, tap.ffn[2]))
    return torch.stack(out)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm weights off 1, biases off 0), so each term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


def test_tap_and_head_match_the_formula_by_hand():
    heads = GANHeads(feature_dim=8, num_taps=2, num_heads=2, ffn_dim=12).double()
    _randomise(heads, seed=0)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(3, 7, 8, generator=g, dtype=torch.float64) * 2 + 0.3 for _ in range(2)]
    for tap, f in zip(heads.taps, features):
        assert tap.registers.shape == (1, 8)
        assert torch.allclose(tap(f), _tap_by_hand(tap, f, num_heads=2), atol=1e-10)
    # concat -> LayerNorm(eps 1e-5) -> Linear(n*D -> D) -> SiLU -> Linear(D -> 1)
    ln, first, _, last = heads.head
    assert first.in_features == 16 and first.out_features == 8  # hidden_dim defaults to D
    cat = torch.cat([_tap_by_hand(tap, f, 2).flatten(1) for tap, f in zip(heads.taps, features)], dim=1)
    hidden = _linear(_layer_norm(cat, 1e-5, ln.weight, ln.bias), first)
    want = _linear(hidden * torch.sigmoid(hidden), last).squeeze(1)
    assert torch.allclose(heads(features), want, atol=1e-10)


def test_heads_options():
    assert GANHeads(feature_dim=8, num_taps=1, num_heads=2, hidden_dim=5).head[1].out_features == 5
    several = GANHeads(feature_dim=8, num_taps=2, num_registers=3, num_heads=2, ffn_dim=4)
    assert several.head[1].in_features == 2 * 3 * 8
    assert several([torch.randn(2, 5, 8), torch.randn(2, 5, 8)]).shape == (2,)
    with pytest.raises(ValueError, match="divisible"):
        GANHeads(feature_dim=8, num_taps=1, num_heads=3)
    with pytest.raises(ValueError, match="timestep"):
        GANHeads(feature_dim=8, num_taps=1, num_heads=2, timestep_conditioning=True, freq_dim=8)([torch.randn(1, 2, 8)])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_critic_gives_gradient_on_the_sample_only(checkpointing):
    """The generator's feedback pass (DESIGN §4): with every critic parameter frozen, gan_generator_gradient
    still differentiates through trunk and heads to the sample, and no parameter gets a .grad."""
    critic = _critic().train()
    if checkpointing:
        critic.enable_gradient_checkpointing()
    critic.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 4, 2, 8, 8, generator=g)
    t, text = torch.tensor([300.0, 600.0]), torch.randn(2, 5, 32, generator=g)

    def logits(x_t):
        return critic.logits(x_t, t, text)

    grad, _ = gan_generator_gradient(x0, noise, t, logits, weight=0.03)
    assert grad.shape == x0.shape and grad.abs().max() > 0
    assert all(p.grad is None for p in critic.parameters())
    sample = x0.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(0.03 * gan_generator_loss(logits(add_noise(sample, noise, t))), sample)
    assert torch.allclose(grad, want, atol=1e-6)
    # unfrozen again for the critic update: the logits train trunk and heads
    critic.requires_grad_(True)
    logits(add_noise(x0, noise, t)).sum().backward()
    assert critic.trunk.blocks[0].attn1.to_q.weight.grad.abs().max() > 0
    assert all(tap.to_q.weight.grad.abs().max() > 0 for tap in critic.heads.taps)
