"""Grade toy-world videos exactly: prompt adherence, sharpness, temporal consistency, Frechet distance.

    python jobs/evaluate.py --videos DIR_OR_S3 [--prompts FILE] [--out report_dir] [--mlflow-run RUN_ID] [overrides]

Videos and prompts are paired by a manifest in the video directory (manifest.jsonl or manifest.parquet
with `path` and `prompt` columns, as the generation job writes), or else by `--prompts` (one prompt per
line) against the directory's mp4 files in name order. Writes report.json (means) and clips.parquet
(one row per clip) under --out, prints a table, and logs the means to an MLflow run when given one.
The world geometry comes from the `world` config section (configs/toy_*.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import fsspec
import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from jobs.cli import run_main
from pipeline import toyworld
from pipeline.config import Config
from pipeline.storage import local_copy
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


def evaluate(video_dir: Path, prompts_file: str | None, world: toyworld.WorldConfig) -> tuple[dict[str, float], list[dict]]:
    pairs = pair_videos(video_dir, prompts_file)
    for line, (_, prompt) in enumerate(pairs, start=1):
        try:
            toyworld.parse_prompt(prompt)
        except ValueError as err:
            raise ValueError(f"prompt {line} ({prompt!r}): {err}") from None
    clips = [read_video(path) for path, _ in tqdm(pairs, desc="decode", unit="clip")]
    for (path, _), clip in zip(pairs, clips):
        if clip.shape[1:3] != (world.height, world.width):
            raise ValueError(f"{path}: {clip.shape[2]}x{clip.shape[1]} frames, the world is {world.width}x{world.height}")
    rows = []
    for (path, prompt), clip in zip(pairs, clips):
        score = toyworld.grade_clip(clip, prompt, world)
        row = {k: v for k, v in dataclasses.asdict(score).items() if k != "objects"}
        rows.append({"path": str(path.name), "prompt": prompt, **{k: float(v) for k, v in row.items()}})
    return toyworld.grade_clips(clips, [p for _, p in pairs], world), rows


def main(cfg: Config, args: argparse.Namespace) -> None:
    out = Path(args.out)
    fs, root = fsspec.core.url_to_fs(args.videos)
    if not fs.isdir(root):
        raise FileNotFoundError(f"video directory {args.videos} does not exist")
    with local_copy(args.videos) as local:
        summary, rows = evaluate(Path(local), args.prompts, cfg.world)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    pq.write_table(pa.Table.from_pylist(rows), out / "clips.parquet")
    width = max(len(k) for k in summary)
    print("\n".join(f"{k:<{width}}  {v:8.4f}" for k, v in summary.items()))
    if args.mlflow_run:
        if cfg.tracking.tracking_uri:
            mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
        with mlflow.start_run(run_id=args.mlflow_run):
            mlflow.log_metrics({f"eval/{k}": v for k, v in summary.items()})
            mlflow.log_artifact(str(out / "report.json"))


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", required=True, help="directory of mp4 files, local or s3://")
    parser.add_argument("--prompts", help="one prompt per line, in the videos' name order (no manifest)")
    parser.add_argument("--out", default="eval_report", help="where report.json and clips.parquet go")
    parser.add_argument("--mlflow-run", help="an MLflow run id to log the means to")


if __name__ == "__main__":
    run_main(main, __doc__, extra_args)
