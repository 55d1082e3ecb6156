"""Codecs: the toy patch codec is exact; the Wan VAE wrapper applies Wan's latent normalisation."""

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from pipeline import toyworld
from pipeline.models.codec import PatchCodec, WanVAECodec, clips_to_video, load_codec, video_to_clips

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 1.5]


def _video(b: int = 2, t: int = 9, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_patch_codec_round_trip_is_exact():
    codec = PatchCodec(4)
    video = _video()
    latents = codec.encode(video)
    assert latents.shape == (2, 48, 9, 8, 8) == (2, *codec.latent_shape(9, 32, 32))
    assert torch.equal(codec.decode(latents), video)
    assert list(codec.state_dict()) == [] and list(codec.parameters()) == []


def test_patch_codec_channel_layout():
    video = _video()
    latents = PatchCodec(4).encode(video)
    # latent channel c*16 + dy*4 + dx at (y, x) is pixel (4y + dy, 4x + dx) of RGB channel c
    assert torch.equal(latents[:, 2 * 16 + 1 * 4 + 3, :, 5, 6], video[:, 2, :, 4 * 5 + 1, 4 * 6 + 3])


def test_patch_codec_scaling_standardises_and_inverts():
    codec = PatchCodec(2, latents_mean=[0.5, 0.0, -0.5], latents_std=[2.0, 4.0, 0.5])
    video = _video()
    latents = codec.encode(video)
    plain = PatchCodec(2).encode(video)
    assert torch.allclose(latents[:, :4], (plain[:, :4] - 0.5) / 2.0)
    assert torch.allclose(latents[:, 8:], (plain[:, 8:] + 0.5) / 0.5)
    assert torch.allclose(codec.decode(latents), video, atol=1e-6)
    with pytest.raises(ValueError, match="3 or 12"):
        PatchCodec(2, latents_mean=[0.0] * 5)


def test_patch_codec_rejects_sizes_it_cannot_tile():
    with pytest.raises(ValueError, match="not divisible"):
        PatchCodec(4).encode(_video(h=30))


def test_toy_clips_survive_the_codec():
    clips = np.stack([toyworld.render("a red square moving left, fast", s) for s in range(2)])
    video = clips_to_video(clips)
    assert video.shape == (2, 3, 9, 32, 32) and video.min() >= -1 and video.max() <= 1
    codec = PatchCodec(4)
    assert torch.equal(codec.decode(codec.encode(video)), video)
    assert np.allclose(video_to_clips(video), clips, atol=1e-6)  # only the [0,1] <-> [-1,1] map rounds


def test_load_codec_specs(tmp_path):
    assert isinstance(load_codec("patch:4"), PatchCodec) and load_codec("patch:2").latent_channels == 12
    for bad in ("patch:x", "vae", str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="codec spec"):
            load_codec(bad)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=MEAN, latents_std=STD
    ).eval()


def test_wan_vae_codec_shapes_and_normalisation(tiny_vae):
    codec = WanVAECodec(tiny_vae)
    video = _video(b=1, h=16, w=16)
    with torch.no_grad():
        latents = codec.encode(video)
        raw = tiny_vae.encode(video).latent_dist.mode()
        decoded = codec.decode(latents)
        expected = tiny_vae.decode(raw).sample
    # 9 frames -> 1 + 8/4 = 3 latent frames; 16 px / 8 = 2
    assert latents.shape == (1, 4, 3, 2, 2) == (1, *codec.latent_shape(9, 16, 16))
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1, 1), torch.tensor(STD).view(1, 4, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-6)
    assert decoded.shape == video.shape and torch.allclose(decoded, expected, atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4n frames"):
        codec.encode(_video(b=1, t=8, h=16, w=16))


def test_wan_vae_codec_keeps_its_statistics_on_the_vae_s_device(tiny_vae):
    """A VAE moved to the GPU before it is wrapped (bench/gpu.py did this) must not leave the latent
    statistics on the CPU: the first decode would mix devices. The meta device stands in for the GPU."""
    codec = WanVAECodec(copy.deepcopy(tiny_vae).to("meta"))
    assert codec.latents_mean.device.type == codec.latents_std.device.type == "meta"
    assert codec.decode(torch.zeros(1, 4, 1, 2, 2, device="meta")).device.type == "meta"


def test_wan_vae_stream_decodes_only_the_new_frames_and_equals_the_whole_decode(tiny_vae):
    """Pieces of 1, 2 and 3 latent frames (a first block, then chunks) through one stream: equal to
    diffusers' decode of the whole clip, with the decoder run once per new latent frame, never over
    the past. Two streams on one VAE do not share state."""
    codec = WanVAECodec(tiny_vae)
    latents = torch.randn(1, 4, 6, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = codec.decode(latents)
    runs = []
    hook = tiny_vae.decoder.register_forward_pre_hook(lambda module, args: runs.append(args[0].shape[2]))
    try:
        stream, other = codec.stream_decoder(), codec.stream_decoder()
        other.decode(torch.randn(1, 4, 2, 2, 2))  # interleaved with the first stream's pieces
        pieces, calls = [], []
        for piece in (slice(0, 1), slice(1, 3), slice(3, 6)):
            runs.clear()
            pieces.append(stream.decode(latents[:, :, piece]))
            calls.append(list(runs))
            other.decode(torch.randn(1, 4, 1, 2, 2))
    finally:
        hook.remove()
    assert [p.shape[2] for p in pieces] == [1, 8, 12]  # 1 frame, then 4 per latent frame
    assert calls == [[1], [1, 1], [1, 1, 1]]  # one latent frame per decoder run, only the new ones
    assert (torch.cat(pieces, 2) - whole).abs().max() <= 1e-5


def test_the_patch_codec_streams_frame_by_frame():
    codec = PatchCodec(4)
    latents = torch.randn(1, 48, 5, 2, 2)
    stream = codec.stream_decoder()
    assert torch.equal(torch.cat([stream.decode(latents[:, :, :2]), stream.decode(latents[:, :, 2:])], 2), codec.decode(latents))


def test_wan_vae_codec_loads_a_folder_or_a_pipeline_checkout(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path / "vae")
    video = _video(b=1, t=5, h=16, w=16)
    with torch.no_grad():
        expected = WanVAECodec(tiny_vae).encode(video)
        for spec in (tmp_path / "vae", tmp_path):
            codec = load_codec(str(spec))
            assert isinstance(codec, WanVAECodec) and torch.equal(codec.encode(video), expected)
