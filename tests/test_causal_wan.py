"""CausalWanModel against independent references: diffusers' own Wan model, and recompute without cache."""

import copy
import threading

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed

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
        assert cache.layer_kv(0)[0].shape[1] == cache.cached_frames * model.tokens_per_frame(8, 8)
    windowed = model(x, t, text, frames_per_block=frames_per_block, window_frames=window).sample
    assert (torch.cat(outs, 2) - windowed).abs().max() <= TOL
    assert cache.num_frames == 6  # positions keep counting while old frames leave
    full = model(x, t, text, frames_per_block=frames_per_block).sample
    if window < 6:  # a window really drops context
        assert (full - windowed).abs().max() > 1e-3
    else:
        assert (full - windowed).abs().max() <= TOL


class _DenseMaskSelfAttention(WanAttnProcessor):
    """diffusers' own processor, its self-attention given a dense (L, L) mask: the reference that the
    mask-free block-causal attention must equal."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.mask if encoder_hidden_states is None else None
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def _dense_block_causal_mask(frames, tokens_per_frame, frames_per_block, window=None, sink=0):
    """Token i sees token j when j's frame is in i's block or before it; with a window, of the frames
    before i's block only the first `sink` and the last `window - sink` (written from the definition)."""
    frame = torch.arange(frames * tokens_per_frame) // tokens_per_frame
    block_start = frame // frames_per_block * frames_per_block
    q_start, k_frame = block_start[:, None], frame[None, :]
    mask = k_frame < q_start + frames_per_block
    if window is not None:
        mask &= (k_frame < sink) | (k_frame >= q_start - (window - sink))
    return mask


@torch.no_grad()
@pytest.mark.parametrize("frames_per_block, window, sink", [(1, None, 0), (2, None, 0), (1, 3, 1), (2, 4, 2), (1, 2, 0)])
def test_mask_free_block_causal_equals_diffusers_wan_with_a_dense_mask(frames_per_block, window, sink):
    model = tiny_wan()
    reference = WanTransformer3DModel(**WAN_CONFIGS["tiny"]).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x, t, text = inputs(frames=8)
    mask = _dense_block_causal_mask(8, model.tokens_per_frame(8, 8), frames_per_block, window, sink)
    for block in reference.blocks:
        block.attn1.set_processor(_DenseMaskSelfAttention(mask))
    ours = model(x, t, text, frames_per_block=frames_per_block, window_frames=window, sink_frames=sink).sample
    assert (ours - reference(x, t, text).sample).abs().max() <= TOL
    cached, _ = _cached_blockwise(model, x, t, text, frames_per_block, window, sink)
    assert (cached - ours).abs().max() <= TOL


def _cached_blockwise(model, x, t, text, frames_per_block, window, sink):
    """Generate block by block: predict a block from the cache, then write it (the rollout's two calls)."""
    cache, outs = model.new_kv_cache(window_frames=window, sink_frames=sink), []
    for start in range(0, x.shape[2], frames_per_block):
        block = slice(start, start + frames_per_block)
        t_block = t[:, block] if t.ndim == 2 else t
        outs.append(model(x[:, :, block], t_block, text, kv_cache=cache).sample)
        model(x[:, :, block], t_block, text, kv_cache=cache, update_cache=True)
    return torch.cat(outs, 2), cache


@torch.no_grad()
@pytest.mark.parametrize(
    "frames_per_block, window, sink, kept",
    [
        (1, 3, 1, [0, 10, 11]),  # framewise, evicting
        (1, 3, 0, [9, 10, 11]),  # sink 0 is the plain sliding window
        (3, 4, 2, [0, 1, 10, 11]),  # chunkwise: block 0 partly kept, the last block partly evicted
        (2, 5, 1, [0, 8, 9, 10, 11]),
        (3, 12, 2, list(range(12))),  # a window as long as the clip evicts nothing
    ],
)
def test_attention_sink_cache_equals_the_sink_masked_block_causal_forward(frames_per_block, window, sink, kept):
    model = tiny_wan()
    x, _, text = inputs(frames=12)
    t = torch.rand(2, 12, generator=torch.Generator().manual_seed(4)) * 1000  # per frame
    cached, cache = _cached_blockwise(model, x, t, text, frames_per_block, window, sink)
    assert cache.frame_positions() == kept and cache.num_frames == 12
    assert cache.layer_kv(0)[0].shape[1] == len(kept) * model.tokens_per_frame(8, 8)
    full = model(x, t, text, frames_per_block=frames_per_block, window_frames=window, sink_frames=sink).sample
    assert (cached - full).abs().max() <= TOL
    unbounded = model(x, t, text, frames_per_block=frames_per_block).sample
    if window >= 12:
        assert (full - unbounded).abs().max() <= TOL
    else:
        assert (full - unbounded).abs().max() > 1e-3
        if sink:  # the sink really is context: it differs from the same window without a sink
            plain = model(x, t, text, frames_per_block=frames_per_block, window_frames=window).sample
            assert (full - plain).abs().max() > 1e-3


@torch.no_grad()
def test_last_block_sees_the_sink_and_the_recent_frames_only():
    """Behaviour, not mechanism: with window 3 and sink 1, framewise, the last frame of 8 depends on
    frames 0, 5, 6 and itself, and on no frame evicted from between them. One layer, so a frame's K/V
    depend on that frame alone (with more, frame 5's K/V carry what frame 4 told it)."""
    model = tiny_wan(num_layers=1)
    x, t, text = inputs(frames=8)
    last = lambda clip: _cached_blockwise(model, clip, t, text, 1, 3, 1)[0][:, :, -1]  # noqa: E731
    base = last(x)
    for frame, seen in [(0, True), (1, False), (4, False), (5, True), (6, True)]:
        changed = x.clone()
        changed[:, :, frame] += 1.0
        assert ((last(changed) - base).abs().max() > 1e-3) == seen, frame


@torch.no_grad()
def test_a_cached_block_sees_all_of_itself_wherever_it_starts():
    """Blocks of a cached call start at the cache's frame count, aligned or not: after one written frame
    a two-frame block is one block, its first frame seeing its second."""
    model = tiny_wan()
    x, t, text = inputs(frames=3)
    cache = model.new_kv_cache()
    model(x[:, :, :1], t, text, kv_cache=cache, update_cache=True)
    changed = x.clone()
    changed[:, :, 2] += 1.0
    a, b = (model(clip[:, :, 1:], t, text, kv_cache=copy.copy(cache)).sample for clip in (x, changed))
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("frames_per_block, window, sink", [(1, None, 0), (3, None, 0), (1, 2, 1), (3, 4, 2), (2, 3, 0)])
def test_fused_write_and_predict_equals_the_two_calls(frames_per_block, window, sink):
    """One call over [block k at t_ctx ; block k+1 at t] writes block k's K/V and predicts block k+1 as
    the separate write and predict calls do, with a window and a sink included."""
    model = tiny_wan()
    f = frames_per_block
    x, t, text = inputs(frames=6 * f)
    t_ctx = torch.full((2,), 25.0)
    caches = [model.new_kv_cache(window, sink) for _ in range(2)]
    for k in range(5):
        clean, noisy = x[:, :, k * f:(k + 1) * f], x[:, :, (k + 1) * f:(k + 2) * f]
        model(clean, t_ctx, text, kv_cache=caches[0], update_cache=True)
        two_calls = model(noisy, t, text, kv_cache=caches[0]).sample
        t_frames = torch.cat([t_ctx[:, None].expand(2, f), t[:, None].expand(2, f)], 1)
        fused = model(torch.cat([clean, noisy], 2), t_frames, text, kv_cache=caches[1], frames_per_block=f,
                      update_cache=True, write_frames=f).sample[:, :, f:]
        assert (fused - two_calls).abs().max() <= 1e-5
        assert caches[1].num_frames == caches[0].num_frames == (k + 1) * f
        for layer in range(len(model.blocks)):
            (k0, v0), (k1, v1) = caches[0].layer_kv(layer), caches[1].layer_kv(layer)
            assert k0.shape == k1.shape and (k0 - k1).abs().max() <= 1e-5 and (v0 - v1).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("offset", [0, 1016, 1020, 1500])
def test_rope_past_the_table_is_diffusers_own_table_built_longer(offset):
    """A stream with a cache window passes the RoPE table's 1024 latent frames (rope_max_seq_len) after
    about four minutes of video: each block's rows, inside the table, across its end and past it, are
    those of diffusers' WanRotaryPosEmbed built for 2048 positions (the block's 8 frames at 4x4 tokens)."""
    model = tiny_wan()
    frames, side = 8, 8
    p_t, p_h, p_w = model.config.patch_size
    tokens = (side // p_h) * (side // p_w)
    longer = WanRotaryPosEmbed(model.config.attention_head_dim, model.config.patch_size, 2048)
    whole = longer(torch.zeros(1, 1, offset + frames, side, side))
    got = model._rope(torch.zeros(1, 1, frames, side, side), offset)
    for g, w in zip(got, whole):
        torch.testing.assert_close(g, w[:, offset * tokens:(offset + frames) * tokens])


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
        model(x, t, text, frames_per_block=1, window_frames=2, kv_cache=model.new_kv_cache())
    with pytest.raises(ValueError, match="needs a kv_cache"):
        model(x, t, text, frames_per_block=1, update_cache=True)
    with pytest.raises(ValueError, match="do not split"):
        model(x, t, text, frames_per_block=4)
    with pytest.raises(ValueError, match="need frames_per_block"):
        model(x, t, text, window_frames=2)
    with pytest.raises(ValueError, match="needs a window"):
        model.new_kv_cache(sink_frames=1)
    with pytest.raises(ValueError, match="sink_frames must be in"):
        model(x, t, text, frames_per_block=1, window_frames=2, sink_frames=2)
    with pytest.raises(ValueError, match="write_frames"):
        model(x, t, text, frames_per_block=3, kv_cache=model.new_kv_cache(), write_frames=3)
    with pytest.raises(ValueError, match="write_frames"):  # half a block's K/V would have seen the other half
        model(x, t, text, frames_per_block=3, kv_cache=model.new_kv_cache(), update_cache=True, write_frames=2)


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
