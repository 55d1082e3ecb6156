"""Batch generation over prompt files: one-step autoregressive clips as mp4, on a Ray Data actor pool.

    python jobs/generate.py --checkpoint PATH_OR_S3 --prompts FILE_OR_GLOB --out DIR_OR_S3 [--config FILE] [overrides]
    ray job submit --working-dir . -- python jobs/generate.py --checkpoint s3://.../student --prompts prompts.txt --out s3://.../videos

Prompt files are those of preprocessing (txt, jsonl, csv, parquet; a `seed` and a `samples` field per
prompt are honoured). Each clip is written as <out>/<id>_<sample>.mp4, where id hashes the prompt and
its base seed and sample k uses seed + k; <out>/manifest.jsonl and manifest.parquet list them (id,
sample, prompt, seed, path, frames, seconds, first_frame_seconds, fps_generated, model_id, source, line).
A rerun skips clips already in the manifest whose file exists. Settings: `generate` (fps, samples, seed,
long clips with num_latent_frames, cache_window and sink_frames, actors and their resources), `method` (step list,
schedule, context noise) and `model` (frames_per_block, latent size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

# Only what parsing the command line needs at the top: torch, Ray and the models load inside the
# functions, so that a mistyped flag or a missing file is reported in a second, not after ~8 s of imports.
from jobs.cli import run_main  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402

if TYPE_CHECKING:
    from pipeline.planning import ClipPlan


def summary_lines(plan: ClipPlan, new: list[dict[str, Any]], seconds: float) -> list[str]:
    from pipeline.planning import SHOWN_BAD_LINES

    lines = [
        f"prompt lines read: {plan.lines}",
        f"skipped bad lines: {len(plan.bad)}",
        *(f"  {b}" for b in plan.bad[:SHOWN_BAD_LINES]),
        f"skipped duplicates: {plan.duplicates}",
        f"skipped, already generated: {len(plan.kept)}",
        f"generated: {len(new)} clips in {seconds:.1f} s",
    ]
    if new:
        lines.append(
            f"per clip: {statistics.mean(r['seconds'] for r in new):.3f} s, first frames after "
            f"{statistics.mean(r['first_frame_seconds'] for r in new):.3f} s, "
            f"{statistics.mean(r['fps_generated'] for r in new):.1f} frames/s"
        )
    return lines


def preflight(checkpoint: str, prompts: str, out: str, student_arch: str) -> list[str]:
    """The checks the driver makes in a second, before Ray and MLflow start; returns the prompt files.
    A single weights file is read as `student_arch` (model.student_arch); a directory carries its own."""
    from pipeline.storage import check_exists, check_writable, naming

    check_exists(checkpoint, "--checkpoint")
    from pipeline import data

    with naming(prompts, "--prompts"):
        files = data.list_files(prompts)
    check_writable(out, "--out")
    from pipeline.models.loading import check_checkpoint

    check_checkpoint(checkpoint, student_arch)  # config.json and tensor headers only
    return files


def run(cfg: Config, checkpoint: str, prompts: str, out: str) -> tuple[ClipPlan, list[dict[str, Any]]]:
    """The whole job on an initialised Ray: returns the plan and the manifest rows of new clips. The
    manifest is rewritten after every finished batch and when the run stops early (Ctrl-C, SIGTERM, an
    error), so a rerun regenerates only the clips that were not finished."""
    import ray.data
    from tqdm import tqdm

    from actors.generator import GeneratorStage
    from pipeline.failures import Interrupted, interrupt_signal
    from pipeline.planning import existing_files, parse_prompt_files, plan_clips, ray_resources, read_manifest, write_manifest
    from pipeline.storage import naming

    files = preflight(checkpoint, prompts, out, cfg.model.student_arch)
    parsed = parse_prompt_files(files, cfg.generate.max_prompt_chars, "generate.max_prompt_chars")
    with naming(out, "--out"):
        plan = plan_clips(parsed, cfg.generate, read_manifest(out), existing_files(out))
    if not plan.pending and not plan.kept:
        shown = "; ".join(str(b) for b in plan.bad[:3])
        raise ValueError(f"{prompts}: no usable prompt ({plan.lines} lines read, {len(plan.bad)} bad" + (f": {shown})" if shown else ")"))
    new: list[dict[str, Any]] = []
    if not plan.pending:
        write_manifest(out, plan.kept)
        return plan, new
    rows = ray.data.from_items(plan.pending, override_num_blocks=len(plan.pending)).map_batches(
        GeneratorStage,
        fn_constructor_kwargs={"checkpoint": checkpoint, "config": cfg.to_dict(), "out": out},
        compute=ray.data.ActorPoolStrategy(size=cfg.generate.actors),
        batch_size=1,
        **ray_resources(cfg.generate.resources),
    )
    try:
        with tqdm(total=len(plan.pending), desc="generate", unit="clip") as progress:
            for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
                new.extend(batch.to_dict("records"))
                progress.update(len(batch))
                write_manifest(out, plan.kept + new)
    except BaseException as err:
        write_manifest(out, plan.kept + new)  # the clips finished so far are not generated again
        signum = interrupt_signal(err)
        if signum is None:
            raise
        raise Interrupted(f"{len(plan.kept) + len(new)} clips kept; rerun to continue", signum) from None
    write_manifest(out, plan.kept + new)
    return plan, new


def main(cfg: Config, args: argparse.Namespace) -> None:
    preflight(args.checkpoint, args.prompts, args.out, cfg.model.student_arch)
    from pipeline.checkpoint import export_settings
    from pipeline.failures import init_ray
    from pipeline.tracking import open_tracker

    settings = export_settings(args.checkpoint)
    if settings:  # what the student was trained with, under the user's --config and overrides
        cfg = load_config(args.config, args.overrides, base=settings)
    init_ray(cfg.ray.address)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="generate-") as run_dir:  # holds only the MLflow run id
        tracker = open_tracker(cfg.tracking, run_dir, cfg.to_dict(), "generate")
        try:
            plan, new = run(cfg, args.checkpoint, args.prompts, args.out)
            seconds = time.perf_counter() - start
            print("\n".join(summary_lines(plan, new, seconds)))
            if new:
                tracker.log_metrics({
                    "clips": len(new), "seconds_per_clip": statistics.mean(r["seconds"] for r in new),
                    "first_frame_seconds": statistics.mean(r["first_frame_seconds"] for r in new),
                    "frames_per_second": statistics.mean(r["fps_generated"] for r in new),
                }, step=0)
        finally:
            tracker.close()  # FAILED or KILLED when an exception or a signal is on its way out


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="student directory (diffusers layout) or weights file, local or s3://")
    parser.add_argument("--prompts", required=True, help="prompt file, directory or glob (txt, jsonl, csv, parquet), local or s3://")
    parser.add_argument("--out", required=True, help="output directory for mp4 files and the manifest, local or s3://")


def check(cfg: Config, args: argparse.Namespace) -> None:
    """--dry-run: the checkpoint's layout and shapes, and the text encoder and codec it would fall back to."""
    from pipeline.models.loading import check_generation_inputs

    check_generation_inputs(args.checkpoint, cfg.model)


if __name__ == "__main__":
    run_main(main, __doc__.splitlines()[0], extra_args, check=check)
