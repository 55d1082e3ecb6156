"""The critic: one trunk forward gives the fake score and the GAN logits."""

import pytest
import torch

from pipeline.models.discriminator import Critic, build_gan_heads
from tests.conftest import tiny_wan


def _critic(timestep_conditioning=False):
    trunk = tiny_wan(seed=1)
    torch.manual_seed(2)
    heads = build_gan_heads(trunk, [0, 1], num_registers=2, num_heads=2, ffn_dim=16, hidden_dim=8,
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
