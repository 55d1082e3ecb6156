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
import json
from pathlib import Path

import fsspec
import mlflow
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import run_main
from pipeline.toyworld.videos import evaluate
from pipeline.config import Config
from pipeline.storage import local_copy


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
