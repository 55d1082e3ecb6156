"""Atomic, resumable checkpoints.

Everything is written under a temporary name and renamed into place, so a run killed mid-write leaves
the previous checkpoint intact. `TrainState` (counters and RNG) is JSON-readable next to the weights.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.config import Config
from pipeline.storage import is_local


@dataclass
class TrainState:
    step: int = 0
    torch_rng: str = ""  # base64 of torch.get_rng_state()

    @classmethod
    def capture(cls, step: int) -> TrainState:
        return cls(step=step, torch_rng=encode_rng(torch.get_rng_state()))

    def restore_rng(self) -> None:
        if self.torch_rng:
            torch.set_rng_state(decode_rng(self.torch_rng))


def encode_rng(state: torch.Tensor) -> str:
    """A torch RNG state (a uint8 tensor) as JSON-safe text."""
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state_json(state: TrainState, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)


def load_state_json(path: str | Path) -> TrainState:
    return TrainState(**json.loads(Path(path).read_text()))


def replace_directory(build: Any, target: str | Path) -> None:
    """Call `build(tmp_dir)` to fill a fresh temporary directory, then swap it in for `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_student(
    weights_file: str, architecture: dict[str, Any], cfg: Config, out: str, source: dict[str, Any] | None = None
) -> None:
    """Write a generation checkpoint at `out` (local or s3://) from the weights of a training checkpoint:

        transformer/        the student (a diffusers WanTransformer3DModel folder)
        tokenizer/, text_encoder/   the text encoder it was trained with
        codec/ or vae/      the latent codec (toy patch codec, or the Wan VAE)
        oneforce.json       the settings it was trained with (block size, latent size, steps, shift)

    built in a temporary directory and moved into place whole."""
    from pipeline.models.causal_wan import CausalWanModel
    from pipeline.models.codec import PatchCodec, load_codec
    from pipeline.models.loading import load_text_encoder

    model = CausalWanModel.from_config(architecture)
    model.load_state_dict(load_file(weights_file), strict=True)

    def build(folder: Path) -> None:
        model.save_pretrained(folder / "transformer")
        load_text_encoder(dataclasses.replace(cfg.model, dtype="float32")).save_pretrained(folder)
        if cfg.model.codec:  # in the layout generation reads, whatever the layout it came in
            codec = load_codec(cfg.model.codec)
            codec.save_pretrained(folder / ("codec" if isinstance(codec, PatchCodec) else "vae"))
        settings = {"model": generation_settings(cfg), "source": source or {}}
        (folder / EXPORT_SETTINGS).write_text(json.dumps(settings, indent=1))

    fs, path = fsspec.core.url_to_fs(out)
    if is_local(fs):
        replace_directory(build, path)
        return
    with tempfile.TemporaryDirectory(prefix="oneforce-export-") as tmp:
        build(Path(tmp))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.put(f"{tmp}/", path, recursive=True)


EXPORT_SETTINGS = "oneforce.json"


def export_settings(checkpoint: str) -> dict[str, Any]:
    """The dotted config settings an exported checkpoint directory was trained with (empty for a single
    weights file or a directory without them): generation uses them unless the user's config says otherwise."""
    fs, path = fsspec.core.url_to_fs(checkpoint)
    settings = f"{path.rstrip('/')}/{EXPORT_SETTINGS}"
    if not fs.isdir(path) or not fs.exists(settings):
        return {}
    return dict(json.loads(fs.cat(settings)).get("model", {}))


def generation_settings(cfg: Config) -> dict[str, Any]:
    """The config keys an exported student needs to generate as it was trained."""
    m, method = cfg.model, cfg.method
    return {
        "model.frames_per_block": m.frames_per_block, "model.num_latent_frames": m.num_latent_frames,
        "model.latent_height": m.latent_height, "model.latent_width": m.latent_width,
        "method.denoising_steps": list(method.denoising_steps), "method.warp_denoising_steps": method.warp_denoising_steps,
        "method.shift": method.shift, "method.context_noise": method.context_noise,
        "method.gradient_num_blocks": method.gradient_num_blocks,  # keeps the config valid for short clips
        "method.inference_schedule": method.inference_schedule,
    }
