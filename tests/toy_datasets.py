"""A preprocessed dataset in the toy world's geometry with random values, for checks of the jobs'
plumbing (tests/test_distill_jobs.py, bench/ray_up_local.py): no teacher or encoder has to run."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import data

FRAMES = 3


def write_toy_debug_dataset(out: Path, rows: int = 4) -> None:
    """48-channel patch-codec latents of FRAMES latent frames and the toy text encoder's (16, 32)
    embeddings, random (seeded), as `rows` teacher rows with two trajectory points."""
    g = torch.Generator().manual_seed(0)
    info = data.DatasetInfo(
        config_hash="toy-debug", teacher_id="random:toy-debug:0", text_embedding=data.TensorSpec((16, 32), "float32"),
        latent=data.TensorSpec((48, FRAMES, 8, 8), "float32"), trajectory_timesteps=(1000.0, 750.0), negative_prompt="",
    )
    data.write_info(str(out), info)
    data.write_negative_prompt(str(out), "", torch.zeros(16, 32))
    data.write_shard(str(out), info, {
        "id": [f"{i:016x}" for i in range(rows)], "prompt": [f"a red square moving left {i}" for i in range(rows)],
        "seed": list(range(rows)), "kind": ["teacher"] * rows,
        "text_embedding": torch.randn(rows, 16, 32, generator=g), "latent": torch.randn(rows, 48, FRAMES, 8, 8, generator=g) * 0.5,
        "trajectory": torch.randn(rows, 2, 48, FRAMES, 8, 8, generator=g),
    })
