"""Grading a directory of toy-world videos: pair each mp4 with its prompt (the generation manifest, or
a prompt file), decode, and grade with the exact grader (jobs/evaluate.py, the quickstart, bench/)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.toyworld.grader import grade_clip, grade_clips
from pipeline.toyworld.grammar import parse_prompt
from pipeline.toyworld.world import WorldConfig
from pipeline.video import read_video


def pair_videos(video_dir: Path, prompts_file: str | None) -> list[tuple[Path, str]]:
    for manifest in ("manifest.parquet", "manifest.jsonl"):
        path = video_dir / manifest
        if path.exists():
            rows = pq.read_table(path).to_pylist() if path.suffix == ".parquet" else [
                json.loads(line) for line in path.read_text().splitlines() if line.strip()
            ]
            for i, row in enumerate(rows):
                if "path" not in row or "prompt" not in row:
                    raise ValueError(f"{path}: row {i + 1} lacks a 'path' or 'prompt' field")
            return [(video_dir / Path(row["path"]).name, row["prompt"]) for row in rows]
    if prompts_file is None:
        raise ValueError(f"{video_dir}: no manifest.jsonl/manifest.parquet; pass --prompts")
    with fsspec.open(prompts_file, "r") as f:
        prompts = [line.strip() for line in f if line.strip()]
    videos = sorted(video_dir.glob("*.mp4"))
    if len(videos) != len(prompts):
        raise ValueError(f"{video_dir} has {len(videos)} mp4 files but {prompts_file} has {len(prompts)} prompts")
    return list(zip(videos, prompts))


def evaluate(video_dir: Path, prompts_file: str | None, world: WorldConfig) -> tuple[dict[str, float], list[dict]]:
    pairs = pair_videos(video_dir, prompts_file)
    for line, (_, prompt) in enumerate(pairs, start=1):
        try:
            parse_prompt(prompt)
        except ValueError as err:
            raise ValueError(f"prompt {line} ({prompt!r}): {err}") from None
    clips = [read_video(path) for path, _ in tqdm(pairs, desc="decode", unit="clip")]
    for (path, _), clip in zip(pairs, clips):
        if clip.shape[1:3] != (world.height, world.width):
            raise ValueError(f"{path}: {clip.shape[2]}x{clip.shape[1]} frames, the world is {world.width}x{world.height}")
    rows = []
    for (path, prompt), clip in zip(pairs, clips):
        score = grade_clip(clip, prompt, world)
        row = {k: v for k, v in dataclasses.asdict(score).items() if k != "objects"}
        rows.append({"path": str(path.name), "prompt": prompt, **{k: float(v) for k, v in row.items()}})
    return grade_clips(clips, [p for _, p in pairs], world), rows
