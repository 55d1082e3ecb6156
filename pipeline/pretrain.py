"""Flow-matching pretraining of the toy world's teacher, and the teacher bundle it produces.

A bundle is a directory laid out like a diffusers Wan pipeline, so every later job loads the toy teacher
the way it loads a real Wan checkout:

    transformer/   CausalWanModel (diffusers WanTransformer3DModel config + safetensors)
    text_encoder/, tokenizer/   the toy umT5 and its word-level tokenizer
    codec/codec.json            the patch codec and its latent statistics
    oneforce.json               world geometry and the sampler settings the teacher was graded with
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import toyworld
from pipeline.flow import add_noise, euler_sample, guided_velocity, sampling_timesteps, shift_noise_level
from pipeline.losses import flow_loss
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.codec import PatchCodec, clips_to_video, load_codec, video_to_clips
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import load_wan

# The trained toy teacher shipped with the package (the command that reproduced it, its loss curve and
# grade are in bench/RESULTS.md). Configs name it by its path from the repository root,
# pipeline/assets/toy_teacher.
SHIPPED_TEACHER = Path(__file__).parent / "assets" / "toy_teacher"

@dataclass
class SamplerSettings:
    steps: int = 25
    shift: float = 3.0
    guidance: float = 4.0


@dataclass
class ToyBundle:
    transformer: CausalWanModel
    text_encoder: TextEncoder
    codec: PatchCodec
    world: toyworld.WorldConfig
    sampler: SamplerSettings

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path)
        self.codec.save_pretrained(path / "codec")
        meta = {"world": dataclasses.asdict(self.world), "sampler": dataclasses.asdict(self.sampler)}
        (path / "oneforce.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ToyBundle:
        path = Path(path)
        if not (path / "oneforce.json").is_file():
            raise FileNotFoundError(f"{path}: not a toy teacher bundle (no oneforce.json)")
        meta = json.loads((path / "oneforce.json").read_text())
        world = meta["world"]
        world["background"] = tuple(world["background"])
        return cls(
            transformer=load_wan(str(path / "transformer")).eval(),
            text_encoder=TextEncoder.from_pretrained(path),
            codec=load_codec(str(path / "codec")),
            world=toyworld.WorldConfig(**world),
            sampler=SamplerSettings(**meta["sampler"]),
        )


def fit_patch_codec(world: toyworld.WorldConfig, patch_size: int, clips: int = 256, seed: int = 0) -> PatchCodec:
    """A PatchCodec whose per-RGB-channel statistics whiten rendered clips, as Wan's latents are whitened.
    The statistics come from inside the world's border only: the bright clock border would otherwise
    almost double the std, shrinking the objects' signal in latent space and doubling how visible
    every sampling error is in pixels."""
    rng = np.random.default_rng(seed)
    prompts = toyworld.all_prompts(world.max_objects)
    rendered = [toyworld.render(prompts[rng.integers(len(prompts))], i, world) for i in range(clips)]
    video = clips_to_video(np.stack([toyworld.interior(clip, world) for clip in rendered]))
    per_channel = video.transpose(0, 1).flatten(1)
    return PatchCodec(patch_size, per_channel.mean(1).tolist(), per_channel.std(1).tolist())


class ToyClips:
    """Training batches rendered on the fly. Batch `step` depends only on (seed, step), so a resumed
    run sees exactly the data it would have seen; prompt embeddings are computed once and cached."""

    def __init__(self, world: toyworld.WorldConfig, codec: PatchCodec, text_encoder: TextEncoder, seed: int) -> None:
        self.world, self.codec, self.seed = world, codec, seed
        self.prompts = toyworld.all_prompts(world.max_objects)
        self.embeddings = torch.cat([text_encoder.encode(self.prompts[i : i + 256]) for i in range(0, len(self.prompts), 256)])
        self.empty = text_encoder.encode([""])[0]

    def batch(self, step: int, size: int, cfg_dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(latents (B, C, F, H, W), text embeddings with `cfg_dropout` of them emptied, prompts)."""
        rng = np.random.default_rng([self.seed, step])
        index = rng.integers(0, len(self.prompts), size)
        prompts = [self.prompts[i] for i in index]
        clips = np.stack([toyworld.render(p, int(rng.integers(1 << 31)), self.world) for p in prompts])
        text = self.embeddings[index].clone()
        text[torch.from_numpy(rng.random(size) < cfg_dropout)] = self.empty
        return self.codec.encode(clips_to_video(clips)), text, prompts


def flow_matching_loss(
    model: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator, shift: float
) -> torch.Tensor:
    """Wan's objective: t = 1000 shift(u), u ~ U[0, 1); regress the velocity e - x0 at x_t."""
    u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64)
    t = (1000.0 * shift_noise_level(u, shift)).float()
    noise = torch.randn(x0.shape, generator=generator)
    return flow_loss(model(add_noise(x0, noise, t), t, text).sample, noise, x0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current.detach(), 1.0 - decay)


def new_ema(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def sample_clips(
    bundle: ToyBundle, prompts: list[str], seed: int = 0, noise: torch.Tensor | None = None, negative_prompt: str = ""
) -> np.ndarray:
    """Clips (B, T, H, W, 3) in [0, 1] from the teacher's multi-step CFG sampler, starting from `noise`
    (B, C, F, H, W), or from noise drawn with `seed`."""
    if noise is None:
        shape = bundle.codec.latent_shape(bundle.world.frames, bundle.world.height, bundle.world.width)
        noise = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(seed))
    cond = bundle.text_encoder.encode(prompts)
    uncond = bundle.text_encoder.encode([negative_prompt]).expand_as(cond)
    velocity = guided_velocity(lambda x, t, c: bundle.transformer(x, t, c).sample, cond, uncond, bundle.sampler.guidance)
    latents, _ = euler_sample(velocity, noise, sampling_timesteps(bundle.sampler.steps, bundle.sampler.shift))
    return video_to_clips(bundle.codec.decode(latents))


def grade_bundle(bundle: ToyBundle, num_prompts: int, seed: int = 1234) -> dict[str, float]:
    """Sample `num_prompts` distinct prompts (spread over the grammar) and grade them exactly."""
    prompts = toyworld.all_prompts(bundle.world.max_objects)
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in rng.permutation(len(prompts))[:num_prompts]]
    clips = np.concatenate([sample_clips(bundle, chosen[i : i + 16], seed + i) for i in range(0, len(chosen), 16)])
    return toyworld.grade_clips(clips, chosen, bundle.world)
