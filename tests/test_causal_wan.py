"""CausalWanModel against independent references: diffusers' own Wan model, and recompute without cache."""

import threading

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from pipeline.models.wan_weights import WAN_CONFIGS
from tests.conftest import tiny_wan

TOL = 1e-4


def inputs(batch=2, frames=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, 5, 32, generator=g)
    return x, t, text


@torch.no_grad()
def test_bidirectional_matches_diffusers_wan():
    model = tiny_wan()
    torch.manual_seed(123)
    reference = WanTransformer3DModel(**WAN_CONFIGS["tiny"]).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x, t, text = inputs()
    assert (model(x, t, text).sample - reference(x, t, text).sample).abs().max() <= TOL
    # per-token timesteps (diffusers' Wan2.2 path) against our per-frame timesteps
    t_frames = torch.rand(2, 6) * 1000
    t_tokens = t_frames.repeat_interleave(16, dim=1)  # 8x8 latent, patch 2x2 -> 16 tokens per frame
    diff = model(x, t_frames, text).sample - reference(x, t_tokens, text).sample
    assert diff.abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("frames_per_block", [1, 3])
@pytest.mark.parametrize("per_frame_t", [False, True])
def test_cached_blocks_equal_block_causal_full_forward(frames_per_block, per_frame_t):
    model = tiny_wan()
    x, t, text = inputs()
    if per_frame_t:
        t = torch.rand(2, 6) * 1000
    full = model(x, t, text, frames_per_block=frames_per_block).sample
    cache, outs = model.new_kv_cache(), []
    for start in range(0, 6, frames_per_block):
        block = slice(start, start + frames_per_block)
        t_block = t[:, block] if per_frame_t else t
        outs.append(model(x[:, :, block], t_block, text, kv_cache=cache).sample)
        model(x[:, :, block], t_block, text, kv_cache=cache, update_cache=True)
    assert (full - torch.cat(outs, dim=2)).abs().max() <= TOL
    assert cache.num_frames == 6


@torch.no_grad()
@pytest.mark.parametrize("frames_per_block, window", [(1, 2), (2, 2), (1, 6)])
def test_sliding_window_cache_equals_the_windowed_block_causal_forward(frames_per_block, window):
    # Reference: one full forward whose mask lets each block see only the `window` frames before it.
    model = tiny_wan()
    x, t, text = inputs()
    cache, outs = model.new_kv_cache(window_frames=window), []
    for start in range(0, 6, frames_per_block):
        block = slice(start, start + frames_per_block)
        outs.append(model(x[:, :, block], t, text, kv_cache=cache).sample)
        model(x[:, :, block], t, text, kv_cache=cache, update_cache=True)
        assert cache.cached_frames == min(start + frames_per_block, window)
        assert cache.self_kv[0][0].shape[1] == cache.cached_frames * model.tokens_per_frame(8, 8)
    windowed = model(x, t, text, frames_per_block=frames_per_block, window_frames=window).sample
    assert (torch.cat(outs, 2) - windowed).abs().max() <= TOL
    assert cache.num_frames == 6  # positions keep counting while old frames leave
    full = model(x, t, text, frames_per_block=frames_per_block).sample
    if window < 6:  # a window really drops context
        assert (full - windowed).abs().max() > 1e-3
    else:
        assert (full - windowed).abs().max() <= TOL


@torch.no_grad()
def test_block_causal_mask_hides_later_blocks_only():
    model = tiny_wan()
    x, t, text = inputs()
    changed = x.clone()
    changed[:, :, 3:] = torch.randn_like(changed[:, :, 3:])
    a = model(x, t, text, frames_per_block=3).sample
    b = model(changed, t, text, frames_per_block=3).sample
    assert (a[:, :, :3] - b[:, :, :3]).abs().max() <= TOL  # block 0 never sees block 1
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-2
    # one block spanning the clip is the bidirectional model
    assert (model(x, t, text, frames_per_block=6).sample - model(x, t, text).sample).abs().max() <= TOL


def test_gradient_checkpointing_recompute_sees_the_cache_it_was_called_with():
    """A cached forward with grad, then a cache write, then backward: checkpoint recompute must use the
    K/V as they were at call time, giving the same gradients as without checkpointing."""
    x, t, text = inputs(batch=1, frames=2)
    grads = []
    for checkpointing in (False, True):
        model = tiny_wan()
        if checkpointing:
            model.enable_gradient_checkpointing()
        cache = model.new_kv_cache()
        with torch.no_grad():
            model(x[:, :, :1], t, text, kv_cache=cache, update_cache=True)
        out = model(x[:, :, 1:], t, text, kv_cache=cache).sample
        with torch.no_grad():
            model(out, t * 0, text, kv_cache=cache, update_cache=True)
        out.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-5


@torch.no_grad()
def test_feature_layers_are_block_outputs():
    model = tiny_wan()
    x, t, text = inputs()
    out = model(x, t, text, feature_layers=(0, 1))
    assert [f.shape for f in out.features] == [(2, 6 * 16, 24)] * 2
    assert not torch.equal(out.features[0], out.features[1])
    assert torch.equal(out.sample, model(x, t, text).sample)


def test_modes_that_cannot_combine_are_rejected():
    model = tiny_wan()
    x, t, text = inputs()
    with pytest.raises(ValueError, match="not both"):
        model(x, t, text, frames_per_block=1, kv_cache=model.new_kv_cache())
    with pytest.raises(ValueError, match="needs a kv_cache"):
        model(x, t, text, frames_per_block=1, update_cache=True)
    with pytest.raises(ValueError, match="do not split"):
        model(x, t, text, frames_per_block=4)


def _cached_second_block(model, x, t, text):
    cache = model.new_kv_cache()
    model(x[:, :, :1], t, text, kv_cache=cache, update_cache=True)
    return model(x[:, :, 1:2], t, text, kv_cache=cache).sample


@torch.no_grad()
def test_concurrent_forwards_from_threads_do_not_share_attention_context():
    """An actor may serve calls from several threads on one model. Each forward's causal context is its
    own: two different forwards that overlap inside the same attention layer give their serial results."""
    model = tiny_wan()
    x_a, t_a, text_a = inputs(batch=1, frames=2, seed=2)
    x_b, t_b, text_b = inputs(batch=1, frames=6, seed=3)
    calls = {
        "cached": lambda: _cached_second_block(model, x_a, t_a, text_a),
        "block_causal": lambda: model(x_b, t_b, text_b, frames_per_block=1).sample,
    }
    serial = {name: call() for name, call in calls.items()}
    # Make both threads meet inside layer 0's self-attention (between the processor's start and its
    # attention), so each is mid-forward while the other runs; once per thread.
    meet, met = threading.Barrier(2, timeout=30), set()

    def rendezvous(module, args):
        if threading.get_ident() not in met:
            met.add(threading.get_ident())
            meet.wait()

    hook = model.blocks[0].attn1.to_k.register_forward_pre_hook(rendezvous)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = calls[name]()
        except Exception as error:  # reported below with the thread's name
            errors.append(f"{name}: {error!r}")

    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        hook.remove()
    assert not errors, errors
    for name in calls:
        assert torch.equal(results[name], serial[name]), name


def test_replaced_processors_fail_loudly_in_causal_modes():
    model = tiny_wan()
    x, t, text = inputs()
    model.set_attn_processor(WanAttnProcessor())
    model(x, t, text)  # bidirectional needs nothing of ours
    with pytest.raises(RuntimeError, match="set_attn_processor"):
        model(x, t, text, frames_per_block=1)
    with pytest.raises(RuntimeError, match="set_attn_processor"):
        model(x[:, :, :1], t, text, kv_cache=model.new_kv_cache())
    model.install_causal_processors()
    with torch.no_grad():
        restored, fresh = (m(x, t, text, frames_per_block=1).sample for m in (model, tiny_wan()))
        assert torch.equal(restored, fresh)
