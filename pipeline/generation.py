"""One-step autoregressive generation from a causal student: whole clips, or frames streamed as each
block is produced. The Python API for a notebook, and what the generation job's actors call.

    gen = ClipGenerator.load("runs/toy_distill/export")   # an export carries its settings; or pass a Config
    for frames in gen.stream("a red square moving left, fast", seed=0):
        show(frames)                                        # (frames_per_block * temporal factor, H, W, 3)
    clip = gen.generate("a red square moving left, fast", seed=0)

A checkpoint directory is laid out like a diffusers Wan pipeline: `transformer/` (required), and
optionally `text_encoder/` + `tokenizer/` and `codec/` (toy) or `vae/` (Wan); parts it lacks come from
`model.text_encoder_path` and `model.codec`. A single weights file (e.g. a Self-Forcing .pt) is read
with `model.student_arch`.

`TeacherClipGenerator` puts a toy teacher's multi-step sampler behind the same timed interface, from the
same noise, for student-versus-teacher comparisons (the quickstart's table, bench/claims.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import noise_seed, prompt_id
from pipeline.failures import about
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.codec import PatchCodec, WanVAECodec, load_codec, video_to_clips
from pipeline.models.loading import torch_dtype
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import load_wan
from pipeline.rollout import inference_schedule, iter_blocks, rollout, training_steps
from pipeline.storage import node_cache


# The one-step toy student that `python jobs/quickstart.py` (full settings) trained from the shipped
# toy teacher, exported at step 600: adherence 1.00 on the 96 prompts (its table: bench/RESULTS.md). The
# streaming server's tests and the README's first `jobs/serve.py` command use it.
SHIPPED_STUDENT = Path(__file__).parent / "assets" / "toy_student"


@dataclass
class GenerationSettings:
    steps: list[float]  # each block's step list (already warped), e.g. [1000.0] for one step
    schedule: Literal["uniform", "first4then1"]
    frames_per_block: int
    num_latent_frames: int
    latent_height: int
    latent_width: int
    context_noise: float = 0.0
    cache_window: int | None = None  # latent frames of context kept; None = all
    sink_frames: int = 0  # of the window, the clip's first latent frames kept for good (attention sink)
    # Each block's cache write inside the next block's first call (pipeline/rollout.py): the same clip
    # with fewer calls; off only to measure or check it.
    fused: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> GenerationSettings:
        m, g = cfg.method, cfg.generate
        frames = g.num_latent_frames or cfg.model.num_latent_frames
        if frames % cfg.model.frames_per_block:
            raise ValueError(f"generate.num_latent_frames={frames} is not a multiple of model.frames_per_block={cfg.model.frames_per_block}")
        return cls(
            steps=training_steps(m.denoising_steps, m.shift, m.warp_denoising_steps),
            schedule=m.inference_schedule,
            frames_per_block=cfg.model.frames_per_block,
            num_latent_frames=frames,
            latent_height=cfg.model.latent_height,
            latent_width=cfg.model.latent_width,
            context_noise=m.context_noise,
            cache_window=g.cache_window or None,
            sink_frames=g.sink_frames,
        )

    @property
    def num_blocks(self) -> int:
        return self.num_latent_frames // self.frames_per_block

    def rollout_options(self) -> dict:
        """The keyword arguments of `iter_blocks` that these settings fix."""
        return dict(context_noise=self.context_noise, cache_window=self.cache_window, sink_frames=self.sink_frames, fused=self.fused)


@dataclass
class Timing:
    first_frame_seconds: float  # from the call to the first decoded frames
    seconds: float  # the whole clip
    frames: int

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def clip_noise(shape: tuple[int, ...], prompt: str, seed: int) -> torch.Tensor:
    """A clip's starting noise on the CPU, from (prompt, seed) alone: every generator of a clip of
    (prompt, seed), student or teacher, starts from it."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(prompt_id(prompt, seed))))


class ClipGenerator:
    """A causal student with its text encoder and codec, generating clips block by block."""

    def __init__(
        self, student: CausalWanModel, text_encoder: TextEncoder, codec: PatchCodec | WanVAECodec,
        settings: GenerationSettings, model_id: str = "",
    ) -> None:
        self.student = student.eval().requires_grad_(False)
        self.text_encoder, self.codec, self.settings, self.model_id = text_encoder, codec, settings, model_id
        self.device = next(student.parameters()).device

    @classmethod
    def load(cls, checkpoint: str, cfg: Config | None = None, device: str | torch.device = "cpu") -> ClipGenerator:
        """`cfg` None: the settings an exported checkpoint carries (oneforce.json), else the defaults."""
        fs, path = fsspec.core.url_to_fs(checkpoint)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint {checkpoint}: no such file or directory")
        if cfg is None:
            from pipeline.checkpoint import export_settings
            from pipeline.config import load_config

            cfg = load_config(base=export_settings(checkpoint))
        dtype = torch_dtype(cfg.model.dtype)
        local = node_cache(checkpoint, "--checkpoint")
        if fs.isdir(path):
            if not fs.isdir(f"{path.rstrip('/')}/transformer"):
                raise FileNotFoundError(f"checkpoint {checkpoint}: a directory needs a transformer/ folder (diffusers layout)")
            student = load_wan(f"{local}/transformer", dtype=dtype)
            has_text = fs.isdir(f"{path.rstrip('/')}/text_encoder")
            codec_dir = next((f"{local}/{d}" for d in ("codec", "vae") if fs.isdir(f"{path.rstrip('/')}/{d}")), None)
        else:
            with about("model.student_arch", cfg.model.student_arch):  # a wrong arch lists every key
                student = load_wan(local, config=cfg.model.student_arch, dtype=dtype)
            has_text, codec_dir = False, None
        if has_text:
            text_encoder = TextEncoder.from_pretrained(local, dtype=dtype)
        elif cfg.model.text_encoder_path:
            text_encoder = TextEncoder.from_pretrained(cfg.model.text_encoder_path, dtype=dtype)
        else:
            text_encoder = TextEncoder.toy()
        codec_spec = codec_dir or cfg.model.codec
        if not codec_spec:
            raise ValueError(f"checkpoint {checkpoint} has no codec/ or vae/ folder: set model.codec")
        codec = load_codec(codec_spec, dtype)
        return cls(student.to(device), text_encoder.to(device), codec.to(device), GenerationSettings.from_config(cfg), checkpoint)

    def noise(self, prompt: str, seed: int) -> torch.Tensor:
        """The starting noise of every block, (1, C, F, H, W), from (prompt, seed) alone: the same clip
        on every machine and in every batch."""
        s = self.settings
        shape = (1, self.student.config.in_channels, s.num_latent_frames, s.latent_height, s.latent_width)
        return clip_noise(shape, prompt, seed).to(self.device)

    def encode(self, prompt: str) -> torch.Tensor:
        """The prompt's text embedding on the student's device (the student casts it to its compute dtype)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"a prompt must be non-empty text, got {prompt!r}")
        return self.text_encoder.encode([prompt]).to(self.device)

    def clip_inputs(self, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[float]], torch.Generator]:
        """A clip's starting noise, text embedding, each block's step list and re-noising generator."""
        text = self.encode(prompt)
        steps = inference_schedule(self.settings.num_blocks, self.settings.steps, self.settings.schedule)
        renoise = torch.Generator(device=self.device).manual_seed(noise_seed(prompt_id(prompt, seed)) ^ 1)
        return self.noise(prompt, seed), text, steps, renoise

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        return video_to_clips(self.codec.decode(latents.float()))[0]

    @torch.no_grad()
    def stream(self, prompt: str, seed: int) -> Iterator[np.ndarray]:
        """Frames (n, H, W, 3) in [0, 1] as each block is generated, each block decoded alone through the
        codec's streaming decoder (its causal caches carry the clip): the frames equal `generate`'s, and
        the decode per block does not grow with the clip. Long clips: `settings.cache_window` and
        `settings.sink_frames`."""
        noise, text, steps, renoise = self.clip_inputs(prompt, seed)
        s = self.settings
        decoder = self.codec.stream_decoder()
        for block in iter_blocks(self.student, noise, text, steps, s.frames_per_block, generator=renoise, **s.rollout_options()):
            yield video_to_clips(decoder.decode(block.float()))[0]

    @torch.no_grad()
    def generate(self, prompt: str, seed: int) -> np.ndarray:
        """The whole clip (T, H, W, 3) in [0, 1]: the rollout of all blocks, then one decode."""
        noise, text, steps, renoise = self.clip_inputs(prompt, seed)
        s = self.settings
        out = rollout(self.student, noise, text, steps, s.frames_per_block, generator=renoise, **s.rollout_options())
        return self._decode(out.x0)

    def timed(self, prompt: str, seed: int) -> tuple[np.ndarray, Timing]:
        """`stream` to completion, timing the first frames and the whole clip."""
        start = time.perf_counter()
        first, parts = None, []
        for frames in self.stream(prompt, seed):
            if first is None:
                first = time.perf_counter() - start
            parts.append(frames)
        clip = np.concatenate(parts)
        return clip, Timing(first or 0.0, time.perf_counter() - start, len(clip))


class TeacherClipGenerator:
    """A toy teacher bundle's multi-step CFG sampler (`pipeline.pretrain.ToyBundle`: the steps, shift and
    guidance it was graded with) behind `ClipGenerator`'s timed interface, for comparing a student with
    its teacher on the same prompts and noise: a clip of (prompt, seed) starts from the noise a student's
    clip of (prompt, seed) starts from. A bidirectional sampler shows no frame before its last step, so
    the first frames arrive with the whole clip."""

    def __init__(self, bundle: str, negative_prompt: str) -> None:
        from pipeline.pretrain import ToyBundle

        self.bundle, self.negative = ToyBundle.load(bundle), negative_prompt
        s = self.bundle.sampler
        self.model_id = f"teacher {bundle} ({s.steps} Euler steps, shift {s.shift:g}, CFG {s.guidance:g})"

    def noise(self, prompt: str, seed: int) -> torch.Tensor:
        """(1, C, F, H, W) from (prompt, seed) alone, as `ClipGenerator.noise`."""
        w = self.bundle.world
        return clip_noise((1, *self.bundle.codec.latent_shape(w.frames, w.height, w.width)), prompt, seed)

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        from pipeline.pretrain import sample_clips  # without gradients

        return sample_clips(self.bundle, [prompt], noise=self.noise(prompt, seed), negative_prompt=self.negative)[0]

    def timed(self, prompt: str, seed: int) -> tuple[np.ndarray, Timing]:
        """The clip, timed from text encoding to decoded frames."""
        start = time.perf_counter()
        clip = self.generate(prompt, seed)
        seconds = time.perf_counter() - start
        return clip, Timing(seconds, seconds, len(clip))
