"""Preprocess prompt files into a Parquet dataset of text embeddings and teacher latents, on Ray Data.

    python jobs/preprocess.py --config configs/toy_preprocess.yaml [data.output=s3://bucket/data] [overrides]
    ray job submit --working-dir . -- python jobs/preprocess.py --config configs/wan_1_3b_framewise.yaml

Pipeline: prompt files (one Ray task per file: parse and validate) -> stable ids, dedupe and resume on
the driver (prompt text only) -> text-encoder actor pool -> teacher-sampler actor pool (multi-step CFG
ODE against the negative prompt, noise seeded by id, trajectory states kept for ODE init) -> Parquet
shards written atomically. Captioned videos (`data.videos`: manifests with `video` and `prompt`) go
text encoder -> VAE-encoder actor pool into the same dataset with kind = real. A rerun skips ids
already written. Schema: pipeline/data.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

# Only what parsing the command line needs at the top: torch, Ray and the models load inside the
# functions, so that a bad setting or a missing file is reported in a second, not after ~8 s of imports.
from jobs.cli import run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402

if TYPE_CHECKING:
    from pipeline.planning import RowPlan


def teacher_schedule(cfg: Config) -> tuple[list[float], list[float]]:
    """(the teacher's ODE timesteps, the trajectory points kept), the latter warped like the student's
    denoising steps and inserted into the former so the solve lands on them exactly."""
    from pipeline.flow import sampling_timesteps, schedule_through
    from pipeline.rollout import training_steps

    keep = training_steps(cfg.data.trajectory_steps, cfg.method.shift, cfg.method.warp_denoising_steps)
    return schedule_through(sampling_timesteps(cfg.data.teacher_steps, cfg.method.shift), keep), keep


def preprocess_settings(cfg: Config) -> dict[str, Any]:
    """Every setting that determines the tensors (hashed into `config_hash`)."""
    m = cfg.model
    return {
        "model": {k: getattr(m, k) for k in ("teacher_path", "teacher_arch", "text_encoder_path", "dtype", "num_latent_frames", "latent_height", "latent_width")},
        "data": {k: getattr(cfg.data, k) for k in ("teacher_steps", "teacher_guidance", "trajectory_steps")},
        "method": {k: getattr(cfg.method, k) for k in ("shift", "warp_denoising_steps", "negative_prompt")},
    }


def _encode_negative(model: dict[str, Any], prompt: str) -> tuple[Any, str]:
    """The negative prompt's embedding (packed) and its dtype: a Ray task on the encoders' resources."""
    from pipeline import data
    from pipeline.config import ModelConfig, build
    from pipeline.failures import about
    from pipeline.models.loading import load_text_encoder

    with about("model.text_encoder_path", model["text_encoder_path"]):
        encoder = load_text_encoder(build(ModelConfig, model))
    embedding = encoder.encode([prompt])[0]
    return data.pack(embedding), str(embedding.dtype).removeprefix("torch.")


MODEL_PATHS = ["teacher_path", "text_encoder_path", "codec"]  # the weights this job loads


def preflight(cfg: Config) -> None:
    """What the driver can check in a second, before Ray and the MLflow run start (each of these used to
    surface from a Ray worker after half a minute of start-up): settings, inputs, the output."""
    from pipeline import data
    from pipeline.models.loading import check_model_paths
    from pipeline.storage import check_writable, naming

    if not (cfg.data.prompts or cfg.data.videos) or not cfg.data.output:
        raise ValueError("set data.prompts and/or data.videos (file, directory or glob) and data.output (directory, local or s3://)")
    for key, spec in (("data.prompts", cfg.data.prompts), ("data.videos", cfg.data.videos)):
        if spec:
            with naming(spec, key):
                data.list_files(spec, data.PROMPT_SUFFIXES if key == "data.prompts" else (".jsonl", ".csv", ".parquet"))
    check_model_paths(cfg.model, MODEL_PATHS)  # layouts and shapes: headers and listings only
    check_writable(cfg.data.output, "data.output")


def summary_lines(plan: RowPlan, written: int, seconds: float) -> list[str]:
    from pipeline.planning import SHOWN_BAD_LINES

    reasons = Counter(b.reason.split(" (")[0] for b in plan.bad)
    lines = [
        f"prompt lines read: {plan.lines}",
        f"skipped bad lines: {len(plan.bad)}" + (f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if plan.bad else ""),
        *(f"  {b}" for b in plan.bad[:SHOWN_BAD_LINES]),
        *([f"  ... {len(plan.bad) - SHOWN_BAD_LINES} more"] if len(plan.bad) > SHOWN_BAD_LINES else []),
        f"skipped duplicates: {plan.duplicates}",
        f"skipped, already written: {plan.already_written}",
        f"written: {written} rows in {seconds:.1f} s" + (f" ({written / seconds:.2f} rows/s)" if seconds > 0 and written else ""),
    ]
    return lines


def run(cfg: Config) -> tuple[RowPlan, int]:
    """The whole job on an initialised Ray; returns the plan (with videos that failed added to its bad
    lines) and the number of rows written."""
    import ray.data
    from tqdm import tqdm

    from actors.encoder import TextEncoderStage, VideoEncoderStage
    from actors.teacher import TeacherSamplerStage
    from pipeline import data
    from pipeline.models.loading import teacher_config, teacher_id
    from pipeline.planning import merge, parse_prompt_files, plan_rows, ray_resources
    from pipeline.storage import naming

    preflight(cfg)
    with naming(cfg.data.output, "data.output"):
        written_before = data.written_ids(cfg.data.output)
    plans = []
    if cfg.data.prompts:
        parsed = parse_prompt_files(data.list_files(cfg.data.prompts), cfg.data.max_prompt_chars)
        plans.append(plan_rows(parsed, cfg.data.seed, written_before))
    if cfg.data.videos:
        parsed = parse_prompt_files(data.list_files(cfg.data.videos, (".jsonl", ".csv", ".parquet")), cfg.data.max_prompt_chars)
        plans.append(plan_rows(parsed, cfg.data.seed, written_before, kind="real"))

    model = dataclasses.asdict(cfg.model)
    packed, text_dtype = ray.get(ray.remote(_encode_negative).options(**ray_resources(cfg.ray.encoder_resources)).remote(model, cfg.method.negative_prompt))
    negative = data.unpack(packed, text_dtype)
    arch = teacher_config(cfg.model)
    latent_shape = (arch["in_channels"], cfg.model.num_latent_frames, cfg.model.latent_height, cfg.model.latent_width)
    timesteps, keep = teacher_schedule(cfg)
    info = data.DatasetInfo(
        config_hash=data.config_hash(preprocess_settings(cfg)),
        teacher_id=teacher_id(cfg.model),
        text_embedding=data.TensorSpec(tuple(negative.shape), text_dtype),
        latent=data.TensorSpec(latent_shape, "float32"),
        trajectory_timesteps=tuple(keep),
        negative_prompt=cfg.method.negative_prompt,
    )
    with naming(cfg.data.output, "data.output"):
        fresh = data.write_info(cfg.data.output, info)
        data.write_negative_prompt(cfg.data.output, cfg.method.negative_prompt, negative, replace=fresh)

    def encoded(pending: list[dict[str, Any]]) -> ray.data.Dataset:
        blocks = min(len(pending), math.ceil(len(pending) / cfg.data.batch_rows))
        return ray.data.from_items(pending, override_num_blocks=blocks).map_batches(
            TextEncoderStage, fn_constructor_kwargs={"model": model}, compute=ray.data.ActorPoolStrategy(size=cfg.ray.encoder_actors),
            batch_size=cfg.data.batch_rows, **ray_resources(cfg.ray.encoder_resources),
        )

    stages = []
    teacher_rows = [r for p in plans for r in p.pending if r["kind"] == "teacher"]
    if teacher_rows:
        stages.append((len(teacher_rows), encoded(teacher_rows).map_batches(
            TeacherSamplerStage,
            fn_constructor_kwargs={
                "model": model, "latent_shape": latent_shape, "timesteps": timesteps, "keep_at": keep,
                "guidance": cfg.data.teacher_guidance, "negative_embedding": packed, "text_dtype": text_dtype,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.teacher_actors), batch_size=cfg.data.batch_rows,
            **ray_resources(cfg.ray.teacher_resources),
        )))
    real_rows = [r for p in plans for r in p.pending if r["kind"] == "real"]
    if real_rows:
        stages.append((len(real_rows), encoded(real_rows).map_batches(
            VideoEncoderStage, fn_constructor_kwargs={"model": model, "latent_shape": latent_shape},
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.encoder_actors), batch_size=cfg.data.batch_rows,
            **ray_resources(cfg.ray.encoder_resources),
        )))
    plan, written = merge(plans), 0
    with tqdm(total=len(plan.pending), desc="preprocess", unit="row") as progress:
        for _, rows in stages:
            # Writing a shard is I/O: it reserves no CPU, so it never waits behind the model actors,
            # which hold every core of a CPU-only node.
            rows = rows.map_batches(data.write_packed_batch, fn_kwargs={"output": cfg.data.output, "info": info},
                                    batch_size=cfg.data.shard_rows, num_cpus=0)
            for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
                failed = batch["reason"] != ""
                written += int((~failed).sum())
                plan.bad += [data.BadLine(str(s), int(n), str(r)) for s, n, r in zip(batch["source"][failed], batch["line"][failed], batch["reason"][failed])]
                progress.update(len(batch["id"]))
    return plan, written


def main(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.failures import init_ray
    from pipeline.tracking import open_tracker

    preflight(cfg)
    init_ray(cfg.ray.address)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="preprocess-") as run_dir:  # holds only the MLflow run id
        tracker = open_tracker(cfg.tracking, run_dir, dataclasses.asdict(cfg), "preprocess")
        try:
            plan, written = run(cfg)
            seconds = time.perf_counter() - start
            print("\n".join(summary_lines(plan, written, seconds)))
            tracker.log_metrics(
                {"lines": plan.lines, "bad_lines": len(plan.bad), "duplicates": plan.duplicates,
                 "already_written": plan.already_written, "written": written, "seconds": seconds}, step=0
            )
        finally:
            tracker.close()  # FAILED or KILLED when an exception or a signal is on its way out


def check(cfg: Config, args: argparse.Namespace) -> None:
    """--dry-run: every weight path's layout and shapes (headers and listings only)."""
    from pipeline.models.loading import check_model_paths

    check_model_paths(cfg.model, MODEL_PATHS)


if __name__ == "__main__":
    run_main(main, __doc__.splitlines()[0], check=check)
