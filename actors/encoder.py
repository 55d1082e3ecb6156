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
