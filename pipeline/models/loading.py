"""Build each model role from the config: a path (local or s3://) loads real weights, an empty path
builds the named architecture with seeded random weights (tests and the toy world's students)."""

from __future__ import annotations

import json

import fsspec
import torch

from pipeline.config import ModelConfig
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import WAN_CONFIGS, load_wan

RANDOM_INIT_SEED = 0


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_teacher(cfg: ModelConfig, device: str | torch.device = "cpu") -> CausalWanModel:
    """The frozen teacher, in eval mode with gradients off."""
    dtype = torch_dtype(cfg.dtype)
    if cfg.teacher_path:
        model = load_wan(cfg.teacher_path, config=cfg.teacher_arch, dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = CausalWanModel(**WAN_CONFIGS[cfg.teacher_arch]).to(dtype)
    return model.to(device).eval().requires_grad_(False)


def teacher_id(cfg: ModelConfig) -> str:
    """What produced a dataset's latents, recorded beside them."""
    return cfg.teacher_path or f"random:{cfg.teacher_arch}:{RANDOM_INIT_SEED}"


def load_text_encoder(cfg: ModelConfig, device: str | torch.device = "cpu") -> TextEncoder:
    """umT5 from `text_encoder_path` (a Wan checkout or a saved folder), or the toy world's encoder."""
    encoder = TextEncoder.from_pretrained(cfg.text_encoder_path, dtype=torch_dtype(cfg.dtype)) if cfg.text_encoder_path else TextEncoder.toy()
    return encoder.to(device)


def teacher_config(cfg: ModelConfig) -> dict:
    """The teacher's architecture (diffusers config dict) without loading its weights: from the
    directory's config.json, or the named built-in architecture."""
    if cfg.teacher_path:
        fs, path = fsspec.core.url_to_fs(cfg.teacher_path)
        if fs.isdir(path):
            return json.loads(fs.cat(f"{path.rstrip('/')}/config.json"))
    return dict(WAN_CONFIGS[cfg.teacher_arch])
