"""Self-forcing rollout against a recompute without cache, call counts, and gradient masking."""

import pytest
import torch

from pipeline.flow import add_noise, x0_from_velocity
from pipeline.rollout import draw_exit_steps, inference_schedule, rollout, training_steps
from tests.conftest import tiny_wan

FRAMES, TEXT = 6, None


def _noise_and_text(batch=1, frames=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, 8, 8, generator=g), torch.randn(batch, 5, 32, generator=g)


def _recompute_one_step(model, noise, text, fpb, t_gen, t_ctx=0.0):
    """Reference without a KV cache: block b = one full block-causal forward over the clean previous
    blocks (at the context timestep) followed by block b's noise at t_gen."""
    clean = []
    for b in range(noise.shape[2] // fpb):
        block = noise[:, :, b * fpb:(b + 1) * fpb]
        x = torch.cat(clean + [block], dim=2)
        t = torch.full((1, x.shape[2]), t_ctx)
        t[:, -fpb:] = t_gen
        v = model(x, t, text, frames_per_block=fpb).sample[:, :, -fpb:]
        clean.append(x0_from_velocity(block, v, torch.tensor([t_gen])))
    return torch.cat(clean, dim=2)


@torch.no_grad()
@pytest.mark.parametrize("fpb", [1, 3])
def test_one_step_rollout_equals_recompute_without_cache(fpb):
    model = tiny_wan()
    noise, text = _noise_and_text()
    steps = inference_schedule(FRAMES // fpb, [1000.0], "uniform")
    out = rollout(model, noise, text, steps, fpb).x0
    assert (out - _recompute_one_step(model, noise, text, fpb, 1000.0)).abs().max() <= 1e-4


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def new_kv_cache(self, window_frames=None, sink_frames=0):
        return self.model.new_kv_cache(window_frames, sink_frames)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@torch.no_grad()
def test_call_counts_one_step_2n_minus_1_four_step_5n_minus_1():
    model = CountingModel(tiny_wan())
    noise, text = _noise_and_text()
    four = training_steps([1000, 750, 500, 250], 5.0, warp=True)
    rollout(model, noise, text, inference_schedule(FRAMES, [1000.0], "uniform"), 1)
    assert model.calls == 2 * FRAMES - 1
    model.calls = 0
    rollout(model, noise, text, inference_schedule(FRAMES, four, "uniform"), 1)
    assert model.calls == 5 * FRAMES - 1
    model.calls = 0
    rollout(model, noise, text, inference_schedule(FRAMES, four, "first4then1"), 1)
    assert model.calls == 4 + (FRAMES - 1) + (FRAMES - 1)


FOUR = training_steps([1000, 750, 500, 250], 5.0, warp=True)


@torch.no_grad()
@pytest.mark.parametrize("fpb, window, sink", [(1, None, 0), (3, None, 0), (1, 3, 1), (3, 4, 2), (2, 3, 0)])
@pytest.mark.parametrize("steps, schedule", [([1000.0], "uniform"), (FOUR, "first4then1"), (FOUR, "uniform")])
def test_fused_rollout_equals_the_unfused_rollout(fpb, window, sink, steps, schedule):
    """The fused cache-write changes the number of calls, not the clip: with context noise (its draw
    and the re-noising share one generator), a window and a sink."""
    model = CountingModel(tiny_wan())
    noise, text = _noise_and_text(frames=12)
    blocks = inference_schedule(12 // fpb, steps, schedule)
    outs, calls = [], []
    for fused in (False, True):
        model.calls = 0
        outs.append(rollout(model, noise, text, blocks, fpb, context_noise=40.0, generator=torch.Generator().manual_seed(3),
                            cache_window=window, sink_frames=sink, fused=fused).x0)
        calls.append(model.calls)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    n = 12 // fpb
    unfused_calls = sum(len(b) for b in blocks) + n - 1
    assert calls == [unfused_calls, unfused_calls - (n - 1)]  # every cache write rode along
    if window is not None:  # the window does bite: without it the clip differs
        unbounded = rollout(model, noise, text, blocks, fpb, context_noise=40.0, generator=torch.Generator().manual_seed(3),
                            fused=True).x0
        assert (unbounded - outs[1]).abs().max() > 1e-3


def test_fused_rollout_with_grad_keeps_the_grad_steps_unfused():
    """Asked for in training, fused leaves a grad-carrying step as the two calls: the same x0 and the
    same gradients as the unfused rollout."""
    noise, text = _noise_and_text(frames=3)
    outs, grads, calls = [], [], []
    for fused in (False, True):
        model = GradRecordingModel(tiny_wan())
        out = rollout(model, noise, text, [FOUR] * 3, 1, exit_steps=[0, 2, 0], gradient_num_blocks=2,
                      generator=torch.Generator().manual_seed(1), context_noise=10.0, fused=fused).x0
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        calls.append(model.calls)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        graph_calls = [i for i, (_, grad, _) in enumerate(model.log) if grad]
        # block 2 exits at its first step, with grad: its cache write (block 1's) is a call of its own
        assert [w for _, _, w in model.log][graph_calls[-1] - 1] is True
    assert calls == [1 + 1 + 3 + 1 + 1, 1 + 3 + 1 + 1]  # block 1's first step (no grad) did fuse
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-5


@torch.no_grad()
def test_exit_step_keeps_that_steps_prediction():
    """Exiting at step k of [t0, t1, t2, t3] equals walking the list [t0 .. tk] to its end."""
    model = tiny_wan()
    noise, text = _noise_and_text(frames=2)
    four = FOUR
    exited = rollout(model, noise, text, [four, four], 1, exit_steps=[1, 1],
                     generator=torch.Generator().manual_seed(7)).x0
    walked = rollout(model, noise, text, [four[:2], four[:2]], 1, generator=torch.Generator().manual_seed(7)).x0
    assert torch.equal(exited, walked)
    # and the first block by hand: predict x0 at t0, re-noise to t1 with the generator's noise, predict again
    g = torch.Generator().manual_seed(7)
    cache = model.new_kv_cache()
    x = noise[:, :, :1]
    x0 = x0_from_velocity(x, model(x, torch.tensor([four[0]]), text, kv_cache=cache).sample, four[0])
    x = add_noise(x0, torch.randn(x0.shape, generator=g), four[1])
    x0 = x0_from_velocity(x, model(x, torch.tensor([four[1]]), text, kv_cache=cache).sample, four[1])
    assert (x0 - exited[:, :, :1]).abs().max() <= 1e-5


def test_exit_steps_are_shared_by_equal_seeds():
    a = draw_exit_steps(7, 4, torch.Generator().manual_seed(3))
    b = draw_exit_steps(7, 4, torch.Generator().manual_seed(3))
    assert a == b and len(set(a)) == 1 and 0 <= a[0] < 4
    per_block = draw_exit_steps(50, 4, torch.Generator().manual_seed(3), same_across_blocks=False)
    assert len(set(per_block)) > 1


def test_gradient_num_blocks_only_last_blocks_carry_grad():
    model = tiny_wan()
    noise, text = _noise_and_text(frames=3)
    steps = inference_schedule(3, [1000.0], "uniform")
    out = rollout(model, noise, text, steps, 1, gradient_num_blocks=1)
    assert out.first_grad_frame == 2
    weights = torch.randn_like(out.x0)
    (out.x0 * weights).sum().backward()
    # The grad-carrying forward uses every parameter of the T2V model, the text pathway (text embedder,
    # cross-attention K/V) included, although the no_grad forwards before it saw the prompt first.
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
    rollout_grads = {name: p.grad.clone() for name, p in params.items()}
    # reference: rebuild the cache without grad, then run only the last block's forward with grad
    model.zero_grad()
    with torch.no_grad():
        first_two = rollout(model, noise[:, :, :2], text, steps[:2], 1).x0
        cache = model.new_kv_cache()
        for f in range(2):
            model(first_two[:, :, f:f + 1], torch.zeros(1), text, kv_cache=cache, update_cache=True)
    last = noise[:, :, 2:]
    x0_last = x0_from_velocity(last, model(last, torch.tensor([1000.0]), text, kv_cache=cache).sample, 1000.0)
    (x0_last * weights[:, :, 2:]).sum().backward()
    for name, p in params.items():
        assert torch.allclose(rollout_grads[name], p.grad, atol=1e-5), name
    # the earlier blocks' frames do not depend on the parameters at all
    early = rollout(model, noise, text, steps, 1, gradient_num_blocks=1).x0[:, :, :2]
    grads = torch.autograd.grad(early.sum(), list(model.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def _rollout_grads(model, noise, text, steps, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = rollout(model, noise, text, steps, 1, generator=torch.Generator().manual_seed(5), **kwargs).x0
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_rollout_with_grad_on_every_block():
    """Grad on block 0 means the first forward on a fresh cache carries grad; its checkpoint recompute
    must run the same ops as the original forward, and the gradients equal those without checkpointing."""
    noise, text = _noise_and_text(frames=3)
    steps = inference_schedule(3, [1000.0], "uniform")
    plain = _rollout_grads(tiny_wan(), noise, text, steps, gradient_num_blocks=3)
    model = tiny_wan()
    model.enable_gradient_checkpointing()
    checkpointed = _rollout_grads(model, noise, text, steps, gradient_num_blocks=3)
    assert all(g.any() for g in plain.values())
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-5), name


class GradRecordingModel(CountingModel):
    """Records, per call, the timestep and whether autograd was recording."""

    def __init__(self, model):
        super().__init__(model)
        self.log: list[tuple[float, bool, bool]] = []  # (t, grad enabled, cache write)

    def forward(self, x, t, text, **kwargs):
        # per-frame timesteps (a fused call): the last frame's, the predicted block's
        self.log.append((float(t[0].reshape(-1)[-1]), torch.is_grad_enabled(), kwargs.get("update_cache", False)))
        return super().forward(x, t, text, **kwargs)


def test_only_the_exit_step_of_grad_blocks_builds_a_graph():
    model = GradRecordingModel(tiny_wan())
    noise, text = _noise_and_text(frames=3)
    four = training_steps([1000, 750, 500, 250], 5.0, warp=True)
    out = rollout(model, noise, text, [four] * 3, 1, exit_steps=[2, 2, 2], gradient_num_blocks=2,
                  generator=torch.Generator().manual_seed(1))
    # per block: steps 0, 1, 2 (the exit), then a cache write at t = 0 after blocks 0 and 1
    block, write = [*four[:3], 0.0], [False, False, False, True]
    assert [t for t, _, _ in model.log] == pytest.approx(block * 2 + block[:3])
    assert [w for _, _, w in model.log] == write * 2 + write[:3]
    graph_calls = [i for i, (_, grad, _) in enumerate(model.log) if grad]
    assert graph_calls == [6, 10]  # the exit steps of blocks 1 and 2, nothing else
    assert out.first_grad_frame == 1 and out.x0.requires_grad


@torch.no_grad()
def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    """Re-noising drawn per sample: a multi-step rollout of two samples equals each one rolled out alone
    (what lets 2 workers x batch 1 reproduce 1 worker x batch 2)."""
    model = tiny_wan()
    noise, text = _noise_and_text(batch=2)
    steps = inference_schedule(FRAMES, training_steps([1000, 750, 500, 250], 5.0, warp=True), "uniform")
    exits = [2] * FRAMES
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = rollout(model, noise, text, steps, 1, exit_steps=exits, context_noise=50.0, generator=gens(7, 8)).x0
    alone = [rollout(model, noise[i:i + 1], text[i:i + 1], steps, 1, exit_steps=exits, context_noise=50.0,
                     generator=gens(seed)).x0 for i, seed in enumerate((7, 8))]
    assert torch.allclose(both, torch.cat(alone), atol=1e-5)
    swapped = rollout(model, noise, text, steps, 1, exit_steps=exits, context_noise=50.0, generator=gens(8, 7)).x0
    assert not torch.allclose(both, swapped, atol=1e-3)  # the generators do drive the re-noising


def _retained_by_a_grad_rollout(model, blocks: int) -> int:
    """Heap bytes a framewise rollout with grad on every block holds until its backward (the graph,
    checkpoint inputs and what they reference)."""
    from pipeline.capacity import held_for_backward

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, blocks, 16, 16, generator=g)
    text = torch.randn(1, 8, 4096, generator=g)
    steps = inference_schedule(blocks, [1000.0], "uniform")
    return held_for_backward(lambda: rollout(model, noise, text, steps, 1, gradient_num_blocks=blocks).x0)


def test_a_checkpointed_rollout_retains_memory_linear_in_its_frames():
    """True width (Wan 1.3B: 1536 wide, 12 heads; 2 layers, a 16x16 latent), grad on every block.
    Each block's K/V are stored once and a checkpointed forward keeps references to them, so doubling
    the frames doubles what is held: 8 -> 16 blocks adds twice what 4 -> 8 did. A cache that copies
    itself on every write, captured by every checkpoint, adds ~4x (the sum of past frames). In fp32:
    the cache's structure does not depend on the dtype, and bf16 costs ~4x fp32's time on a CPU
    without native bf16 GEMM (tests/test_capacity.py measures bf16)."""
    from pipeline.capacity import measurement_model

    model = measurement_model(2, torch.float32, checkpointing=True)
    _retained_by_a_grad_rollout(model, 2)  # warm-up: lazily built tables and allocator pools
    held = {blocks: _retained_by_a_grad_rollout(model, blocks) for blocks in (4, 8, 16)}
    growth = (held[16] - held[8]) / (held[8] - held[4])
    assert 1.6 <= growth <= 2.5, held
