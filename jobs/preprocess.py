"""Preprocess prompt files into a Parquet dataset of text embeddings and teacher latents, on Ray Data.

    python jobs/preprocess.py --config configs/toy_preprocess.yaml [data.output=s3://bucket/data] [overrides]
    ray job submit --working-dir . -- python jobs/preprocess.py --config configs/wan_1_3b_framewise.yaml

Pipeline: prompt files (one Ray task per file: parse and validate) -> stable ids, dedupe and resume on
the driver (prompt text only) -> text-encoder actor pool -> teacher-sampler actor pool (multi-step CFG
ODE against the negative prompt, noise seeded by id, trajectory states kept for ODE init) -> Parquet
shards written atomically. A rerun skips ids already written. Schema: pipeline/data.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections import Counter
from typing import Any

import ray
from tqdm import tqdm

from actors.encoder import TextEncoderStage
from actors.teacher import TeacherSamplerStage
from jobs.cli import run_main
from pipeline import data
from pipeline.config import Config
from pipeline.flow import sampling_timesteps, schedule_through
from pipeline.models.loading import load_text_encoder, teacher_config, teacher_id
from pipeline.rollout import training_steps
from pipeline.tracking import open_tracker

SHOWN_BAD_LINES = 20


def ray_resources(resources: dict[str, float]) -> dict[str, Any]:
    """A config resource dict ({"CPU": 1, "GPU": 1, "custom": 1}) as Ray's num_cpus/num_gpus/resources."""
    rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), **({"resources": rest} if rest else {})}


def parse_prompt_files(files: list[str], max_chars: int) -> list[dict[str, Any]]:
    """Every line of every file (`data.prompt_file_rows`), one Ray task per file."""
    items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return items.flat_map(lambda row: data.prompt_file_rows(row["path"], max_chars), num_cpus=0.5).take_all()


@dataclasses.dataclass
class Plan:
    """What this run will do, decided on the driver from the parsed prompt lines."""

    pending: list[dict[str, Any]]  # rows to compute: id, prompt, seed, kind
    lines: int
    bad: list[data.BadLine]
    duplicates: int
    already_written: int


def plan_rows(parsed: list[dict[str, Any]], default_seed: int, written: set[str]) -> Plan:
    """Expand samples into seeds, give every (prompt, seed) its id, keep the first of duplicates, skip
    ids already written. Lines keep file order, so the plan is the same on every run."""
    good, bad = data.split_rows(parsed)
    seen: set[str] = set()
    pending, duplicates, already = [], 0, 0
    for r in good:
        first = default_seed if r["seed"] < 0 else r["seed"]
        for seed in range(first, first + max(1, r["samples"])):
            row_id = data.prompt_id(r["prompt"], seed)
            if row_id in seen:
                duplicates += 1
                continue
            seen.add(row_id)
            if row_id in written:
                already += 1
                continue
            pending.append({"id": row_id, "prompt": r["prompt"], "seed": seed, "kind": "teacher"})
    return Plan(pending, len(parsed), bad, duplicates, already)


def teacher_schedule(cfg: Config) -> tuple[list[float], list[float]]:
    """(the teacher's ODE timesteps, the trajectory points kept), the latter warped like the student's
    denoising steps and inserted into the former so the solve lands on them exactly."""
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


@ray.remote
def _encode_negative(model: dict[str, Any], prompt: str) -> tuple[Any, str]:
    from pipeline.config import ModelConfig, build

    embedding = load_text_encoder(build(ModelConfig, model)).encode([prompt])[0]
    return data.pack(embedding), str(embedding.dtype).removeprefix("torch.")


def _write_shard(batch: dict[str, Any], output: str, info: data.DatasetInfo) -> dict[str, Any]:
    rows = {
        "id": list(batch["id"]), "prompt": list(batch["prompt"]), "seed": list(batch["seed"]), "kind": list(batch["kind"]),
        "text_embedding": data.unpack(batch["text_embedding"], info.text_embedding.dtype),
        "latent": data.unpack(batch["latent"], info.latent.dtype),
        "trajectory": data.unpack(batch["trajectory"], info.latent.dtype) if info.trajectory_timesteps else None,
    }
    path = data.write_shard(output, info, rows)
    return {"id": batch["id"], "shard": [path] * len(batch["id"])}


def summary_lines(plan: Plan, written: int, seconds: float) -> list[str]:
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


def run(cfg: Config) -> tuple[Plan, int]:
    """The whole job on an initialised Ray; returns the plan and the number of rows written."""
    if not cfg.data.prompts or not cfg.data.output:
        raise ValueError("set data.prompts (file, directory or glob) and data.output (directory, local or s3://)")
    files = data.list_files(cfg.data.prompts)
    plan = plan_rows(parse_prompt_files(files, cfg.data.max_prompt_chars), cfg.data.seed, data.written_ids(cfg.data.output))

    model = dataclasses.asdict(cfg.model)
    packed, text_dtype = ray.get(_encode_negative.options(**ray_resources(cfg.ray.encoder_resources)).remote(model, cfg.method.negative_prompt))
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
    data.write_info(cfg.data.output, info)
    data.write_negative_prompt(cfg.data.output, cfg.method.negative_prompt, negative)
    if not plan.pending:
        return plan, 0

    rows = ray.data.from_items(plan.pending, override_num_blocks=min(len(plan.pending), math.ceil(len(plan.pending) / cfg.data.batch_rows)))
    rows = rows.map_batches(
        TextEncoderStage,
        fn_constructor_kwargs={"model": model},
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.encoder_actors),
        batch_size=cfg.data.batch_rows,
        **ray_resources(cfg.ray.encoder_resources),
    )
    rows = rows.map_batches(
        TeacherSamplerStage,
        fn_constructor_kwargs={
            "model": model, "latent_shape": latent_shape, "timesteps": timesteps, "keep_at": keep,
            "guidance": cfg.data.teacher_guidance, "negative_embedding": packed, "text_dtype": text_dtype,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.teacher_actors),
        batch_size=cfg.data.batch_rows,
        **ray_resources(cfg.ray.teacher_resources),
    )
    rows = rows.map_batches(_write_shard, fn_kwargs={"output": cfg.data.output, "info": info}, batch_size=cfg.data.shard_rows, num_cpus=0.1)
    written = 0
    with tqdm(total=len(plan.pending), desc="preprocess", unit="row") as progress:
        for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
            written += len(batch["id"])
            progress.update(len(batch["id"]))
    return plan, written


def main(cfg: Config, args: argparse.Namespace) -> None:
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None)
    start = time.perf_counter()
    tracker = open_tracker(cfg.tracking, tempfile.mkdtemp(prefix="preprocess-"), dataclasses.asdict(cfg), "preprocess")
    try:
        plan, written = run(cfg)
        seconds = time.perf_counter() - start
        print("\n".join(summary_lines(plan, written, seconds)))
        tracker.log_metrics(
            {"lines": plan.lines, "bad_lines": len(plan.bad), "duplicates": plan.duplicates,
             "already_written": plan.already_written, "written": written, "seconds": seconds}, step=0
        )
    finally:
        tracker.close()


if __name__ == "__main__":
    run_main(main, __doc__.splitlines()[0])
