"""Open-ended streams (pipeline/live.py): a stream that never switches shows the clip `generate` makes;
a prompt switch keeps the frames made before it and changes the ones after; past the clip's length the
cache window keeps the stream's memory flat."""

import numpy as np
import pytest
import torch

from pipeline.generation import ClipGenerator
from pipeline.live import LiveStream
from tests.test_generation import checkpoint, generation_config  # noqa: F401

RED, BLUE = "a red square moving left, fast", "a blue circle moving up, slow"


def frames_of(stream: LiveStream, blocks: int, switch_at: int | None = None, prompt: str = BLUE) -> list[np.ndarray]:
    out = []
    for block in range(blocks):
        if block == switch_at:
            stream.switch_prompt(prompt)
        out.append(stream.next_frames())
    return out


@pytest.mark.parametrize("overrides", [
    [],  # framewise, one step
    ["model.frames_per_block=2", "method.denoising_steps=[1000,750,500,250]", "method.inference_schedule=first4then1"],
])
def test_a_stream_that_never_switches_shows_the_generated_clip(checkpoint, overrides):
    gen = ClipGenerator.load(str(checkpoint), generation_config(*overrides))
    stream = LiveStream(gen, RED, seed=3)
    frames = frames_of(stream, gen.settings.num_blocks)
    assert stream.done
    np.testing.assert_allclose(np.concatenate(frames), gen.generate(RED, seed=3), atol=1e-5)
    with pytest.raises(RuntimeError, match="made its 4 blocks|made its 2 blocks"):
        stream.next_frames()


@pytest.mark.parametrize("fused", [True, False])
def test_a_prompt_switch_keeps_the_past_and_changes_what_follows(checkpoint, fused):
    gen = ClipGenerator.load(str(checkpoint), generation_config())
    gen.settings.fused = fused
    red, blue = gen.generate(RED, seed=3), gen.generate(BLUE, seed=3)
    switched = np.concatenate(frames_of(LiveStream(gen, RED, seed=3), 4, switch_at=2))
    np.testing.assert_allclose(switched[:2], red[:2], atol=1e-5)  # made before the switch
    assert not np.allclose(switched[2:], red[2:], atol=1e-3) and not np.allclose(switched[2:], blue[2:], atol=1e-3)
    # The blocks before the switch stay in the cache as they were made (each under its own prompt), so
    # one call that writes the last red block and makes the first blue one must not be fused.
    gen.settings.fused = not fused
    other = np.concatenate(frames_of(LiveStream(gen, RED, seed=3), 4, switch_at=2))
    np.testing.assert_allclose(switched, other, atol=1e-5)


def state_growth(gen: ClipGenerator, blocks: int) -> tuple[int, LiveStream]:
    """What the stream's cache and decoder hold after its last block minus after a third of them."""
    stream, held = LiveStream(gen, RED, seed=0, max_blocks=blocks), []
    for _ in range(blocks):
        frames = stream.next_frames()
        assert frames.shape == (1, 32, 32, 3) and np.isfinite(frames).all()
        held.append(stream.held_bytes())
    return held[-1] - held[blocks // 3], stream


def test_past_the_clip_the_window_keeps_memory_flat(checkpoint):
    gen = ClipGenerator.load(str(checkpoint), generation_config())
    with pytest.raises(ValueError, match="longer than the clip .4 blocks.: set generate.cache_window"):
        LiveStream(gen, RED, seed=0, max_blocks=16)
    windowed = ClipGenerator.load(str(checkpoint), generation_config("generate.cache_window=3", "generate.sink_frames=1"))
    growth, stream = state_growth(windowed, 16)  # 4x the clip the settings describe
    assert stream.done and stream.rollout.cache.cached_frames == 3
    assert stream.rollout.cache.frame_positions() == [0, 13, 14]  # the sink, then the newest frames, at their absolute positions
    # A 16-block clip without a window keeps every frame's K/V.
    unbounded, _ = state_growth(ClipGenerator.load(str(checkpoint), generation_config("generate.num_latent_frames=16")), 16)
    assert growth == 0 and unbounded > 0, (growth, unbounded)
