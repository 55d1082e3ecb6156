"""Generator actors: a Ray Data `map_batches` callable that loads the causal student once and turns
prompt rows into mp4 files, returning one manifest row per clip; and a toy teacher's clips beside them."""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.encoder import default_device
from pipeline.config import Config, build
from pipeline.generation import ClipGenerator, TeacherClipGenerator
from pipeline.video import write_mp4


def clip_name(row_id: str, sample: int) -> str:
    return f"{row_id}_{sample}.mp4"


class GeneratorStage:
    """Rows with id, sample, prompt, seed -> the same rows plus path (file name under `out`), frames,
    seconds, first_frame_seconds, fps_generated and model_id."""

    def __init__(self, checkpoint: str, config: dict[str, Any], out: str) -> None:
        cfg = build(Config, config)
        self.generator = ClipGenerator.load(checkpoint, cfg, default_device())
        self.fps, self.out = cfg.generate.fps, out.rstrip("/")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {k: [] for k in ("path", "frames", "seconds", "first_frame_seconds", "fps_generated", "model_id")}
        for row_id, sample, prompt, seed in zip(batch["id"], batch["sample"], batch["prompt"], batch["seed"]):
            clip, timing = self.generator.timed(str(prompt), int(seed))
            name = clip_name(str(row_id), int(sample))
            write_mp4(clip, f"{self.out}/{name}", fps=self.fps)
            out["path"].append(name)
            out["frames"].append(timing.frames)
            out["seconds"].append(timing.seconds)
            out["first_frame_seconds"].append(timing.first_frame_seconds)
            out["fps_generated"].append(timing.frames_per_second)
            out["model_id"].append(self.generator.model_id)
        return {**batch, **{k: np.asarray(v) for k, v in out.items()}}


class TeacherClips:
    """A toy teacher's clips, to compare with its student's (the quickstart's teacher stage): its
    multi-step sampler (`pipeline.generation.TeacherClipGenerator`) on each of the student's manifest
    rows (id, sample, prompt, seed, path), written as mp4 and returned as a manifest row, timed like the
    student's."""

    def __init__(self, bundle: str, negative_prompt: str, fps: int, out: str) -> None:
        self.generator, self.fps, self.out = TeacherClipGenerator(bundle, negative_prompt), fps, out

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        clip, t = self.generator.timed(row["prompt"], int(row["seed"]))
        write_mp4(clip, f"{self.out}/{row['path']}", fps=self.fps)
        return {**row, "frames": t.frames, "seconds": t.seconds, "first_frame_seconds": t.first_frame_seconds,
                "fps_generated": t.frames_per_second, "model_id": self.generator.model_id}
