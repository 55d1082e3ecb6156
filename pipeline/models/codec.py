"""Video codecs: pixels (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, T', H', W').

Two codecs share one small interface (`encode`, `decode`, `latent_shape`, `stream_decoder`, and the
factors below):
- `PatchCodec`, the toy world's: an exact, parameter-free space-to-depth, so the toy measures the method
  and not a learned autoencoder's errors;
- `WanVAECodec`, diffusers' `AutoencoderKLWan` with the latent normalisation Wan's pipelines apply:
  latents = (mode(posterior) - latents_mean) / latents_std on the way in, the inverse on the way out
  (`WanPipeline.__call__` and `WanVideoToVideoPipeline.prepare_latents` in diffusers).
`load_codec("patch:4")` or `load_codec("/path/to/vae")` picks one.

Streaming: `codec.stream_decoder()` decodes a clip piece by piece, each call only the latent frames it
is given, and the pieces concatenated equal `decode` of the whole clip. Both codecs are causal in time
(the patch codec per frame; the Wan VAE's decoder keeps a cache of each causal convolution's last
frames), so a stream never re-decodes its past and the cost per frame does not grow with the clip.
"""

from __future__ import annotations

import json

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import fsspec
import numpy as np
import torch
from diffusers import AutoencoderKLWan
from torch import nn

from pipeline.storage import load_pickled_tensors, node_cache


class Codec(Protocol):
    """What the rest of the project relies on."""

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...

    def stream_decoder(self) -> StreamDecoder: ...


class StreamDecoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pixels of the next latent frames of the clip, given only those frames."""
        ...


def _channel_stats(values: Sequence[float] | None, fill: float, patch_size: int) -> torch.Tensor:
    """Per-latent-channel statistics (3*p*p,): given per RGB channel (3,) or per latent channel."""
    channels = 3 * patch_size**2
    if values is None:
        return torch.full((channels,), fill)
    stats = torch.as_tensor(values, dtype=torch.float32)
    if stats.numel() == 3:
        return stats.repeat_interleave(patch_size**2)  # latent channel c*p*p + i belongs to RGB channel c
    if stats.numel() != channels:
        raise ValueError(f"latent statistics need 3 or {channels} values, got {stats.numel()}")
    return stats


class PatchCodec(nn.Module):
    """Exact space-to-depth: (B, 3, T, H, W) -> (B, 3*p*p, T, H/p, W/p), no parameters.

    Latent channel c*p*p + dy*p + dx holds pixel (p*y + dy, p*x + dx) of RGB channel c. Optional fixed
    statistics normalise the latents as Wan's do, (z - mean) / std; without them decode(encode(x)) == x
    bit for bit, with them to float rounding.
    """

    temporal_factor = 1

    def __init__(
        self,
        patch_size: int = 4,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.spatial_factor = patch_size
        self.latent_channels = 3 * patch_size**2
        self.scaled = latents_mean is not None or latents_std is not None
        # Buffers (not parameters) so .to(device) moves them; non-persistent so the state dict stays empty.
        self.register_buffer("latents_mean", _channel_stats(latents_mean, 0.0, patch_size).view(1, -1, 1, 1, 1), False)
        self.register_buffer("latents_std", _channel_stats(latents_std, 1.0, patch_size).view(1, -1, 1, 1, 1), False)

    def save_pretrained(self, path: str | Path) -> None:
        """Write `codec.json` (patch size and statistics) so `load_codec(path)` rebuilds this codec."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        spec = {"type": "patch", "patch_size": self.patch_size}
        if self.scaled:
            spec["latents_mean"] = self.latents_mean.flatten().tolist()
            spec["latents_std"] = self.latents_std.flatten().tolist()
        (path / "codec.json").write_text(json.dumps(spec, indent=1))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"frame size {height}x{width} is not divisible by the patch size {p}")
        return self.latent_channels, frames, height // p, width // p

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        _, _, hp, wp = self.latent_shape(t, h, w)
        p = self.patch_size
        z = video.reshape(b, c, t, hp, p, wp, p).permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * p * p, t, hp, wp)
        return (z - self.latents_mean) / self.latents_std if self.scaled else z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            latents = latents * self.latents_std + self.latents_mean
        b, channels, t, hp, wp = latents.shape
        p = self.patch_size
        if channels != self.latent_channels:
            raise ValueError(f"PatchCodec(patch_size={p}) decodes {self.latent_channels} channels, got {channels}")
        x = latents.reshape(b, 3, p, p, t, hp, wp).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(b, 3, t, hp * p, wp * p)

    def stream_decoder(self) -> PatchCodec:
        return self  # per frame: decoding the next frames alone is decoding them


class WanVAECodec(nn.Module):
    """diffusers' `AutoencoderKLWan` with Wan's latent normalisation; T frames -> 1 + (T-1)/4 latents.

    encode uses the posterior's mode (the pipelines' `sample_mode="argmax"`), so it is deterministic.
    Both directions compute the normalisation in float32 and return float32; decode is clamped to
    [-1, 1] by the VAE itself.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.latent_channels = config.z_dim
        self.spatial_factor = config.scale_factor_spatial
        self.temporal_factor = config.scale_factor_temporal
        shape = (1, config.z_dim, 1, 1, 1)
        # On the VAE's device, so wrapping a VAE already moved to the GPU needs no second `.to`.
        stats = {"dtype": torch.float32, "device": vae.device}
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, **stats).view(shape), False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, **stats).view(shape), False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAECodec:
        """Load a Diffusers VAE folder (config.json of AutoencoderKLWan), a Diffusers checkout (its vae/),
        Wan's own `Wan2.1_VAE.pth`, or a Wan2.1 release folder holding it. Anything else is refused: a
        folder with some other config.json (a release root names its DiT there) would otherwise build a
        randomly initialised VAE with only warnings."""
        found = vae_layout(fsspec.filesystem("file"), str(path))
        if found.endswith(".pth"):
            return cls(load_original_vae(found, dtype))
        return cls(AutoencoderKLWan.from_pretrained(found, torch_dtype=dtype))

    def save_pretrained(self, path: str | Path) -> None:
        """The VAE's own diffusers folder (config.json + weights): `load_codec(path)` reads it back."""
        self.vae.save_pretrained(path)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s, k = self.spatial_factor, self.temporal_factor
        if (frames - 1) % k or height % s or width % s:
            raise ValueError(
                f"the Wan VAE needs 1 + {k}n frames and sides divisible by {s}, got {frames}x{height}x{width}"
            )
        return self.latent_channels, 1 + (frames - 1) // k, height // s, width // s

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.latent_shape(*video.shape[2:])  # validates
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        return (posterior.mode().float() - self.latents_mean) / self.latents_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def stream_decoder(self) -> WanVAEStream:
        return WanVAEStream(self)


class WanVAEStream:
    """One clip's decode, piece by piece, through the Wan VAE's causal caches.

    It runs what `AutoencoderKLWan._decode` runs for each latent frame (its decoder on one frame, the
    first as `first_chunk`, with the cache of every causal convolution's last frames), but the cache is
    this object's and outlives the call: the next piece continues the clip. Only the frames given are
    decoded. The VAE itself holds no state of it, so one VAE serves several streams at once. (Tiling is
    not applied: the Wan configs decode 480x832 whole.)"""

    def __init__(self, codec: WanVAECodec) -> None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.codec = codec
        convolutions = sum(isinstance(m, WanCausalConv3d) for m in codec.vae.decoder.modules())
        self.cache: list[torch.Tensor | None] = [None] * convolutions
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        codec, vae = self.codec, self.codec.vae
        z = latents.float() * codec.latents_std + codec.latents_mean
        x = vae.post_quant_conv(z.to(vae.dtype))  # a 1x1x1 convolution: frame by frame already
        frames = []
        for i in range(x.shape[2]):
            frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=self.first))
            self.first = False
        out = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).float()


WAN_VAE_FILE = "Wan2.1_VAE.pth"  # the name in Wan2.1's own releases


def vae_layout(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The Wan VAE at `path` on `fs` (local, or remote for the driver's checks): a Diffusers VAE folder
    (config.json of AutoencoderKLWan), a Diffusers checkout's vae/, Wan's own `Wan2.1_VAE.pth`, or a
    Wan2.1 release folder holding it. Anything else is refused: a folder with another config.json (a
    release root names its DiT there) would build a randomly initialised VAE with only warnings."""
    path = path.rstrip("/")
    if fs.isdir(f"{path}/vae"):
        path = f"{path}/vae"
    if fs.isfile(f"{path}/{WAN_VAE_FILE}"):
        path = f"{path}/{WAN_VAE_FILE}"
    if fs.isfile(path) and path.endswith(".pth"):
        return path
    config = json.loads(fs.cat(f"{path}/config.json")) if fs.isfile(f"{path}/config.json") else {}
    if config.get("_class_name") != "AutoencoderKLWan":
        raise ValueError(
            f"{path}: not a Wan VAE: expected a folder with an AutoencoderKLWan config.json, a Diffusers checkout "
            f"with vae/, or {WAN_VAE_FILE}"
        )
    return path


def load_original_vae(file: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """Wan's own VAE checkpoint, keys converted by diffusers' `convert_wan_vae_to_diffusers`. Only the
    widths are read from the weights (`base_dim`, `z_dim`); the rest is Wan2.1's VAE, which is what
    diffusers' defaults and its converter describe."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    raw = load_pickled_tensors(file)
    state = convert_wan_vae_to_diffusers({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})
    if "encoder.conv_in.weight" not in state or "post_quant_conv.weight" not in state:
        raise ValueError(f"{file}: not a Wan VAE checkpoint (no encoder.conv1 / conv2 weights)")
    base_dim, z_dim = state["encoder.conv_in.weight"].shape[0], state["post_quant_conv.weight"].shape[0]
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
    expected = vae.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state] + [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"shape {k}: file {list(v.shape)} vs model {list(expected[k].shape)}" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError(f"{file}: the weights do not match Wan2.1's VAE: {'; '.join(problems[:3])} ({len(problems)} in all)")
    vae.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return vae.to(dtype).eval()


def load_codec(spec: str, dtype: torch.dtype = torch.float32) -> PatchCodec | WanVAECodec:
    """"patch:<p>" -> PatchCodec(p); a saved patch codec, a Wan VAE folder or checkout, or Wan2.1_VAE.pth
    (local or any fsspec URL) -> that codec."""
    if spec.startswith("patch:"):
        size = spec.removeprefix("patch:")
        if not size.isdigit():
            raise ValueError(f"codec spec {spec!r}: expected 'patch:<int>', e.g. 'patch:4'")
        return PatchCodec(int(size))
    spec = node_cache(spec)  # s3:// and other fsspec URLs: this node's copy
    if (Path(spec) / "codec.json").is_file():
        saved = json.loads((Path(spec) / "codec.json").read_text())
        return PatchCodec(saved["patch_size"], saved.get("latents_mean"), saved.get("latents_std"))
    if Path(spec).is_dir() or (Path(spec).is_file() and spec.endswith(".pth")):
        return WanVAECodec.from_pretrained(spec, dtype)
    raise ValueError(f"codec spec {spec!r} is neither 'patch:<int>' nor an existing Wan VAE folder or {WAN_VAE_FILE}")


def clips_to_video(clips: np.ndarray) -> torch.Tensor:
    """Toy-world clips (B, T, H, W, 3) in [0, 1] -> codec input (B, 3, T, H, W) in [-1, 1], float32."""
    return torch.from_numpy(np.asarray(clips, np.float32)).permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


def video_to_clips(video: torch.Tensor) -> np.ndarray:
    """Codec output (B, 3, T, H, W) in [-1, 1] -> clips (B, T, H, W, 3) in [0, 1], clamped, float32."""
    return video.detach().float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()
