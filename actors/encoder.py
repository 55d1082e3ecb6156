"""Text-encoder actors: a Ray Data `map_batches` callable holding the umT5 (or toy) encoder.

Used with `compute=ray.data.ActorPoolStrategy(size=n)`, so each actor loads the encoder once and then
serves batches; resources (a GPU on a cluster) come from `ray.encoder_resources`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.data import pack
from pipeline.models.loading import load_text_encoder


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TextEncoderStage:
    """Adds `text_embedding` (B, L, D) to a batch with a `prompt` column."""

    def __init__(self, model: dict[str, Any]) -> None:
        from pipeline.config import build

        self.encoder = load_text_encoder(build(ModelConfig, model), default_device())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # One prompt per call: a row's embedding is then bit-identical whatever batch it arrives in.
        embeddings = [self.encoder.encode([str(p)])[0] for p in batch["prompt"]]
        return {**batch, "text_embedding": pack(torch.stack(embeddings))}


class VideoEncoderStage:
    """Adds `latent` (B, C, F, H, W) and `reason` to a batch of captioned videos (`video` column): each
    mp4 is decoded, checked against the frames and size the dataset's latents need, and VAE-encoded
    (the toy patch codec, or the Wan VAE from `model.codec`). A video that cannot be used gets a
    `reason` and a zero latent, and the writer skips it."""

    def __init__(self, model: dict[str, Any], latent_shape: tuple[int, int, int, int]) -> None:
        from pipeline.config import build
        from pipeline.models.codec import load_codec
        from pipeline.models.loading import torch_dtype

        cfg = build(ModelConfig, model)
        if not cfg.codec:
            raise ValueError("captioned videos need model.codec (a Wan VAE directory, or 'patch:4' in the toy world)")
        self.codec = load_codec(cfg.codec, torch_dtype(cfg.dtype)).to(default_device())
        self.latent_shape = tuple(latent_shape)
        _, frames, height, width = self.latent_shape
        k, s = self.codec.temporal_factor, self.codec.spatial_factor
        self.video_shape = (1 + (frames - 1) * k, height * s, width * s)

    def encode(self, path: str) -> torch.Tensor:
        from pipeline.models.codec import clips_to_video
        from pipeline.storage import local_copy
        from pipeline.video import read_video

        with local_copy(path) as local:
            clip = read_video(local)
        if clip.shape[:3] != self.video_shape:
            raise ValueError(f"{clip.shape[0]} frames of {clip.shape[2]}x{clip.shape[1]}, the latents need "
                             f"{self.video_shape[0]} of {self.video_shape[2]}x{self.video_shape[1]}")
        return self.codec.encode(clips_to_video(clip[None]).to(default_device()))[0].float().cpu()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        latents, reasons = [], []
        for path in batch["video"]:
            try:
                latents.append(self.encode(str(path)))
                reasons.append("")
            except (ValueError, OSError) as err:
                latents.append(torch.zeros(self.latent_shape))
                reasons.append(f"video {path}: {str(err).removeprefix(str(path) + ': ')}")
        return {**batch, "latent": pack(torch.stack(latents)), "reason": np.asarray(reasons)}
