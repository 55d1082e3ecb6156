"""Teacher actors. `TeacherSamplerStage` is the Ray Data `map_batches` callable that runs the frozen
teacher's multi-step CFG ODE for preprocessing: one actor per device, loading the teacher once."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actors.encoder import default_device
from pipeline.config import ModelConfig, build
from pipeline.data import noise_seed, pack, unpack
from pipeline.flow import euler_sample, guided_velocity
from pipeline.models.loading import load_teacher


class TeacherSamplerStage:
    """Adds `latent` (B, C, F, H, W) and `trajectory` (B, K, C, F, H, W) to a batch with `id` and
    `text_embedding`: each row is sampled from noise seeded by its id alone, with classifier-free
    guidance against the negative prompt, along `timesteps`, keeping the states at `keep_at`."""

    def __init__(
        self,
        model: dict[str, Any],
        latent_shape: tuple[int, int, int, int],
        timesteps: list[float],
        keep_at: list[float],
        guidance: float,
        negative_embedding: np.ndarray,
        text_dtype: str,
    ) -> None:
        self.device = default_device()
        self.teacher = load_teacher(build(ModelConfig, model), self.device)
        self.latent_shape, self.timesteps, self.keep_at, self.guidance = tuple(latent_shape), timesteps, keep_at, guidance
        self.text_dtype = text_dtype
        self.negative = unpack(negative_embedding, text_dtype).to(self.device)[None]
        self.dtype = next(self.teacher.parameters()).dtype

    @torch.no_grad()
    def sample(self, row_id: str, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, trajectory (K, ...)) of one row."""
        noise = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(noise_seed(row_id)))
        cond = text.to(self.device, self.dtype)[None]
        uncond = self.negative.to(self.dtype)
        velocity = guided_velocity(lambda x, t, c: self.teacher(x.to(self.dtype), t, c).sample, cond, uncond, self.guidance)
        latent, kept = euler_sample(velocity, noise[None].to(self.device), self.timesteps, self.keep_at)
        trajectory = torch.stack([kept[float(t)][0] for t in self.keep_at]) if self.keep_at else torch.zeros(0, *self.latent_shape)
        return latent[0].cpu(), trajectory.cpu()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = unpack(batch["text_embedding"], self.text_dtype)
        latents, trajectories = zip(*(self.sample(str(i), t) for i, t in zip(batch["id"], texts)))
        return {**batch, "latent": pack(torch.stack(latents)), "trajectory": pack(torch.stack(trajectories))}
