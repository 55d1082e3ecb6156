"""The notebook API: a toy checkpoint generates clips block by block; streamed frames equal the batch
result; the same seed gives the same frames; long clips run through a sliding-window cache."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.generation import ClipGenerator
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.codec import PatchCodec
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import WAN_CONFIGS


def save_toy_checkpoint(path):
    """A tiny causal student in the diffusers pipeline layout (transformer/, text_encoder/, tokenizer/,
    codec/), random weights: what tests of generation start from."""
    torch.manual_seed(0)
    CausalWanModel(**WAN_CONFIGS["toy-debug"]).save_pretrained(path / "transformer")
    TextEncoder.toy().save_pretrained(path)
    PatchCodec(4, [0.2] * 3, [0.4] * 3).save_pretrained(path / "codec")
    return path


GENERATION_BASE = ["model.student_arch=toy-debug", "model.num_latent_frames=4", "model.latent_height=8", "model.latent_width=8",
                   "method.gradient_num_blocks=1", "method.shift=3.0"]


def generation_config(*overrides):
    return load_config(None, GENERATION_BASE + list(overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("overrides", [
    [],  # framewise, one step
    ["model.frames_per_block=2", "method.denoising_steps=[1000,750,500,250]"],  # chunkwise, four steps
    ["method.denoising_steps=[1000,750,500,250]", "method.inference_schedule=first4then1"],
])
def test_streamed_frames_equal_the_batch_clip(checkpoint, overrides):
    gen = ClipGenerator.load(str(checkpoint), generation_config(*overrides))
    streamed = list(gen.stream("a red square moving left, fast", seed=3))
    assert [len(f) for f in streamed] == [gen.settings.frames_per_block] * gen.settings.num_blocks
    clip = gen.generate("a red square moving left, fast", seed=3)
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.float32
    np.testing.assert_allclose(np.concatenate(streamed), clip, atol=1e-5)


def test_same_seed_same_frames_other_seed_or_prompt_other_frames(checkpoint):
    gen = ClipGenerator.load(str(checkpoint), generation_config())
    a = gen.generate("a red square moving left, fast", seed=1)
    assert np.array_equal(a, ClipGenerator.load(str(checkpoint), generation_config()).generate("a red square moving left, fast", seed=1))
    assert not np.allclose(a, gen.generate("a red square moving left, fast", seed=2))
    assert not np.allclose(a, gen.generate("a blue circle moving up, slow", seed=1))


def test_long_clips_use_a_sliding_window(checkpoint):
    gen = ClipGenerator.load(str(checkpoint), generation_config("generate.num_latent_frames=10", "generate.cache_window=3"))
    clip, timing = gen.timed("a green triangle moving down, slow", seed=0)
    assert clip.shape == (10, 32, 32, 3) and timing.frames == 10 and 0 < timing.first_frame_seconds < timing.seconds
    full = ClipGenerator.load(str(checkpoint), generation_config("generate.num_latent_frames=10"))
    # The first frames see the same context either way; later ones lose the frames that left the window.
    np.testing.assert_allclose(clip[:4], full.generate("a green triangle moving down, slow", seed=0)[:4], atol=1e-5)


def test_long_clips_with_an_attention_sink(checkpoint):
    """The sink keeps the first frames in context: the clip equals the sliding window's while nothing
    has left the window, and differs from it (and from the full context) after."""
    long = ["generate.num_latent_frames=10", "generate.cache_window=3"]
    sink = ClipGenerator.load(str(checkpoint), generation_config(*long, "generate.sink_frames=1"))
    assert (sink.settings.cache_window, sink.settings.sink_frames) == (3, 1)
    clips = {name: gen.generate("a green triangle moving down, slow", seed=0) for name, gen in (
        ("sink", sink), ("window", ClipGenerator.load(str(checkpoint), generation_config(*long))),
        ("full", ClipGenerator.load(str(checkpoint), generation_config(long[0]))),
    )}
    np.testing.assert_allclose(clips["sink"][:4], clips["window"][:4], atol=1e-5)
    assert np.abs(clips["sink"][4:] - clips["window"][4:]).max() > 1e-3
    assert np.abs(clips["sink"][4:] - clips["full"][4:]).max() > 1e-3
    streamed = np.concatenate(list(sink.stream("a green triangle moving down, slow", seed=0)))
    np.testing.assert_allclose(streamed, clips["sink"], atol=1e-5)


@pytest.mark.parametrize("overrides", [
    ["generate.num_latent_frames=8", "generate.cache_window=3", "generate.sink_frames=1"],
    ["model.frames_per_block=2", "method.denoising_steps=[1000,750,500,250]", "method.inference_schedule=first4then1"],
])
def test_the_generator_fuses_cache_writes_and_fused_frames_equal_unfused(checkpoint, overrides):
    gen = ClipGenerator.load(str(checkpoint), generation_config(*overrides))
    assert gen.settings.fused  # on by default
    calls = []
    hook = gen.student.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fused = gen.generate("a red square moving left, fast", seed=5)
        fused_calls = len(calls)
        gen.settings.fused = False
        unfused = gen.generate("a red square moving left, fast", seed=5)
    finally:
        hook.remove()
    np.testing.assert_allclose(fused, unfused, atol=1e-5)
    assert len(calls) - fused_calls - fused_calls == gen.settings.num_blocks - 1  # one write per later block saved


@pytest.mark.parametrize("overrides, message", [
    (["generate.sink_frames=1"], "generate.sink_frames=1 needs generate.cache_window above it"),
    (["generate.cache_window=2", "generate.sink_frames=2"], "needs generate.cache_window above it"),
    (["generate.sink_frames=-1"], "must be >= 0"),
])
def test_sink_frames_out_of_range_are_refused(overrides, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        generation_config(*overrides)


def test_a_checkpoint_without_a_transformer_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs a transformer/ folder"):
        ClipGenerator.load(str(tmp_path / "empty"), generation_config())


def test_an_empty_prompt_is_refused(checkpoint):
    gen = ClipGenerator.load(str(checkpoint), generation_config())
    for prompt in ("", "   "):
        with pytest.raises(ValueError, match="a prompt must be non-empty text"):
            gen.generate(prompt, seed=0)


def test_mp4_files_follow_the_umask(tmp_path):
    import os

    from pipeline.video import write_mp4

    old = os.umask(0o022)
    try:
        write_mp4(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "a.mp4")
    finally:
        os.umask(old)
    assert (tmp_path / "a.mp4").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("override, message", [
    ("data.trajectory_steps=[1500, 500]", r"data.trajectory_steps must lie in \(0, 1000\]"),
    ("data.teacher_guidance=-1", "data.teacher_guidance must be >= 0"),
])
def test_data_settings_out_of_range_are_refused(override, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
