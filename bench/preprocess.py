"""Preprocessing throughput: the Ray Data pipeline against a plain single-process loop doing the same
work (parse, text-encode, teacher ODE with CFG and trajectory, Parquet shards) on the same toy models.

Both write a dataset from the same prompt file; the Ray side is timed end to end from `preprocess.run`
(Ray Data start-up included, `ray.init` not: a cluster is started once, not per job). Runs alternate
(plain, Ray, plain, Ray, ...) so machine noise hits both; the ratio of medians is printed.

    python bench/preprocess.py                        # 48 prompts, toy teacher arch, 25 steps, 2 rounds
    python bench/preprocess.py --rows 192 --teacher-actors 2   # the recorded result (2 rounds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.encoder import TextEncoderStage
from actors.teacher import TeacherSamplerStage
from jobs import preprocess
from pipeline import data, toyworld
from pipeline.config import Config, load_config


def bench_config(prompts: str, output: str, args: argparse.Namespace) -> Config:
    cpu = 2.0 / (args.teacher_actors + 1)  # the encoder actor and the teacher actors share the 2 cores
    overrides = {
        "model.teacher_arch": "toy", "model.codec": "patch:4", "model.num_latent_frames": 9, "model.latent_height": 8,
        "model.latent_width": 8, "method.gradient_num_blocks": 9, "method.shift": 3.0, "data.teacher_steps": args.steps,
        "data.teacher_guidance": 4.0, "data.shard_rows": 16, "data.batch_rows": 4, "ray.teacher_actors": args.teacher_actors,
        "ray.teacher_resources": f"{{CPU: {cpu}}}", "ray.encoder_resources": f"{{CPU: {cpu}}}", "tracking.tracking_uri": "none",
        "data.prompts": prompts, "data.output": output,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def plain_loop(cfg: Config) -> int:
    """The same work in this process, one row after another, with the same stage classes."""
    lines = [r for f in data.list_files(cfg.data.prompts) for r in data.prompt_file_rows(f, cfg.data.max_prompt_chars)]
    plan = preprocess.plan_rows(lines, cfg.data.seed, data.written_ids(cfg.data.output))
    model = dataclasses.asdict(cfg.model)
    encoder = TextEncoderStage(model)
    negative = encoder.encoder.encode([cfg.method.negative_prompt])[0]
    timesteps, keep = preprocess.teacher_schedule(cfg)
    latent_shape = (48, cfg.model.num_latent_frames, cfg.model.latent_height, cfg.model.latent_width)
    teacher = TeacherSamplerStage(model, latent_shape, timesteps, keep, cfg.data.teacher_guidance, data.pack(negative), "float32")
    info = data.DatasetInfo(
        config_hash=data.config_hash(preprocess.preprocess_settings(cfg)), teacher_id="bench",
        text_embedding=data.TensorSpec(tuple(negative.shape), "float32"), latent=data.TensorSpec(latent_shape, "float32"),
        trajectory_timesteps=tuple(keep), negative_prompt=cfg.method.negative_prompt,
    )
    data.write_info(cfg.data.output, info)
    rows = plan.pending
    for start in range(0, len(rows), cfg.data.shard_rows):
        chunk = rows[start : start + cfg.data.shard_rows]
        batch = {k: np.array([r[k] for r in chunk]) for k in ("id", "prompt", "seed", "kind", "source", "line")}
        data.write_packed_batch(teacher(encoder(batch)), cfg.data.output, info)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--teacher-actors", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    # Past the grammar's 96 single-object prompts, the same prompts again with the next seed (a new id).
    grammar = toyworld.all_prompts(1)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": grammar[i % len(grammar)], "seed": i // len(grammar)}) + "\n" for i in range(args.rows)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    times: dict[str, list[float]] = {"plain": [], "ray": []}
    torch.set_num_threads(2)
    for r in range(args.rounds):
        for name in ("plain", "ray"):
            cfg = bench_config(str(prompts), str(work / f"{name}{r}"), args)
            start = time.perf_counter()
            written = plain_loop(cfg) if name == "plain" else preprocess.run(cfg)[1]
            times[name].append(time.perf_counter() - start)
            assert written == args.rows, (name, written)
    ray.shutdown()
    same = data.read_dataset(str(work / "plain0"))["latent"].numpy().tobytes() == data.read_dataset(str(work / "ray0"))["latent"].numpy().tobytes()
    plain, distributed = statistics.median(times["plain"]), statistics.median(times["ray"])
    print(f"{args.rows} rows, toy teacher (48x9x8x8 latents), {args.steps} CFG steps, {args.teacher_actors} teacher actor(s), 2 CPUs")
    print(f"plain loop {plain:.1f} s ({args.rows / plain:.2f} rows/s), Ray Data {distributed:.1f} s ({args.rows / distributed:.2f} rows/s)")
    print(f"Ray / plain throughput: {plain / distributed:.2f}x (target >= 0.8); identical latents: {same}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
