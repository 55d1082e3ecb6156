"""Sample videos during training: the student (its EMA once there is one) on fixed prompts and fixed
noise, one step per block, decoded by the run's codec; written as one mp4 grid and one PNG strip
(a row per prompt, a column per frame) for MLflow."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import data
from pipeline.config import Config
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.codec import load_codec, video_to_clips
from pipeline.models.loading import torch_dtype
from pipeline.models.wan_weights import cast_like_from_pretrained
from pipeline.rollout import inference_schedule, rollout, training_steps
from pipeline.video import grid, to_uint8, write_mp4


def fixed_samples(output: str, count: int) -> dict[str, Any]:
    """The first `count` rows (by id) of the dataset's first shard: ids, prompts, text embeddings."""
    paths = data.shard_paths(output)
    if not paths or count <= 0:
        return {}
    shard = data.read_shard(paths[0], data.read_info(output))
    order = sorted(range(len(shard["id"])), key=shard["id"].__getitem__)[:count]
    return {
        "id": [shard["id"][i] for i in order], "prompt": [shard["prompt"][i] for i in order],
        "text": shard["text_embedding"][order].float(),
    }


@functools.lru_cache(maxsize=2)
def _codec(spec: str, dtype: torch.dtype, device: str):
    """The run's codec, loaded once per process and device (a Wan VAE is downloaded once, not per render)."""
    return load_codec(spec, dtype).to(device)


@torch.no_grad()
def render(
    architecture: dict[str, Any], weights: dict[str, torch.Tensor], samples: dict[str, Any], cfg: Config,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Clips (N, T, H, W, 3) in [0, 1] of the student with `weights` on the fixed samples, computed on
    `device` in the run's `model.dtype` (a Train worker renders on its own accelerator)."""
    dtype = torch_dtype(cfg.model.dtype)
    with torch.device(device):
        model = CausalWanModel.from_config(architecture)
    model.load_state_dict(weights)
    model = cast_like_from_pretrained(model.eval().requires_grad_(False), dtype)
    m = cfg.model
    shape = (model.config.in_channels, m.num_latent_frames, m.latent_height, m.latent_width)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(data.noise_seed(i))) for i in samples["id"]])
    steps = training_steps(cfg.method.denoising_steps, cfg.method.shift, cfg.method.warp_denoising_steps)
    schedule = inference_schedule(m.num_blocks, steps, cfg.method.inference_schedule)
    text = samples["text"].to(device)
    latents = rollout(model, noise.to(device), text, schedule, m.frames_per_block, context_noise=cfg.method.context_noise).x0
    return video_to_clips(_codec(m.codec, dtype, str(device)).decode(latents.float()))


def frame_strip(clips: np.ndarray, gap: int = 2) -> np.ndarray:
    """(N, T, H, W, 3) -> one uint8 image, a row per clip and a column per frame."""
    n, t, h, w, _ = clips.shape
    image = np.full((n * (h + gap) - gap, t * (w + gap) - gap, 3), 255, np.uint8)
    for row, clip in enumerate(to_uint8(clips)):
        for column, frame in enumerate(clip):
            image[row * (h + gap): row * (h + gap) + h, column * (w + gap): column * (w + gap) + w] = frame
    return image


def write_samples(clips: np.ndarray, folder: str | Path, step: int, fps: int) -> list[Path]:
    """`samples_<step>.mp4` (the clips side by side) and `samples_<step>.png` (the frame strip)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    video, strip = folder / f"samples_{step:06d}.mp4", folder / f"samples_{step:06d}.png"
    write_mp4(grid(list(clips), columns=len(clips)), video, fps=fps)
    Image.fromarray(frame_strip(clips)).save(strip)
    return [video, strip]
