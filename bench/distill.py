"""Distillation step throughput and memory: Ray Train + DeepSpeed (ZeRO-2) + a teacher actor, one
worker, colocated on this machine, against the plain single-process loop doing the same math
(`pipeline.distill.plain_distill`: the same step functions, torch AdamW, an in-process teacher).

Both train the toy architecture (teacher, student and critic from the same random weights, as
configs/toy_distill.yaml's shapes: 9 latent frames of 8x8, one step per block) on the same synthetic
dataset for the same steps. Throughput is steps per second of wall time between the end of step
`--warmup` and the last step (Ray and DeepSpeed start-up excluded: paid once per run, not per step);
memory is the peak RSS of the plain process against the Train worker's plus the teacher actor's.
Rounds alternate (plain, Ray, plain, Ray, ...) and the ratio of medians is printed.

    python bench/distill.py                  # 2 rounds of 40 steps, batch 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from pipeline import data, distill, trainer
from pipeline.config import Config, load_config


def write_dataset(out: str, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    info = data.DatasetInfo(
        config_hash="bench", teacher_id="random:toy:0", text_embedding=data.TensorSpec((16, 32), "float32"),
        latent=data.TensorSpec((48, 9, 8, 8), "float32"), trajectory_timesteps=(), negative_prompt="",
    )
    data.write_info(out, info)
    data.write_negative_prompt(out, "", torch.zeros(16, 32))
    data.write_shard(out, info, {
        "id": [f"{i:016x}" for i in range(rows)], "prompt": [f"p{i}" for i in range(rows)], "seed": list(range(rows)),
        "kind": ["teacher"] * rows, "text_embedding": torch.randn(rows, 16, 32, generator=g),
        "latent": torch.randn(rows, 48, 9, 8, 8, generator=g),
    })


def bench_config(dataset: str, storage: str, name: str, args: argparse.Namespace) -> Config:
    return load_config("configs/toy_distill.yaml", [
        f"name={name}", f"data.output={dataset}", f"train.storage_path={storage}", "tracking.tracking_uri=none",
        "model.teacher_path=''", "model.student_path=''", "model.text_encoder_path=''", "model.codec=patch:4",
        f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.batch_size={args.batch}",
        "ray.resources_per_worker={CPU: 0.5}", "ray.teacher_resources={CPU: 0.5}",
    ])


def steps_per_second(times: list[float], warmup: int) -> float:
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def plain_round(cfg: Config, warmup: int, threads: int, queue) -> None:
    """In a child process, so its peak RSS is its own."""
    torch.set_num_threads(threads)
    ctx = distill.plain_context(cfg, data.read_negative_prompt(cfg.data.output))
    batches = distill.epoch_batches(data.read_dataset(cfg.data.output), cfg.train.batch_size)
    times = []
    for step in range(cfg.train.steps):
        rows = next(batches)
        distill.distill_step(ctx, distill.rows_to_batch(rows, distill.global_indices(step, 0, 1, cfg.train.batch_size)), step)
        times.append(time.time())
    queue.put((steps_per_second(times, warmup), trainer.peak_rss_mb()))


def ray_round(cfg: Config, warmup: int) -> tuple[float, float, float]:
    from actors.teacher import TeacherPool

    pool = TeacherPool.start(cfg, data.read_negative_prompt(cfg.data.output))
    try:
        result = trainer.fit(cfg, "distill", pool)
        teacher_rss = ray.get(pool.actors[0].peak_rss_mb.remote())
    finally:
        pool.shutdown()
    with result.checkpoint.as_directory() as directory:
        import json

        history = json.loads((Path(directory) / trainer.STATE_FILE).read_text())["history"]
    worker_rss = history[-1]["peak_rss_mb"]
    return steps_per_second([h["time"] for h in history], warmup), worker_rss + teacher_rss, teacher_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop (the Train worker and the "
                        "teacher actor get Ray's one each)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        write_dataset(f"{tmp}/data", rows=4 * args.batch)
        plain, distributed = [], []
        for round_ in range(args.rounds):
            cfg = bench_config(f"{tmp}/data", f"{tmp}/runs", f"round{round_}", args)
            queue = mp.get_context("spawn").Queue()
            child = mp.get_context("spawn").Process(target=plain_round, args=(cfg, args.warmup, args.threads, queue))
            child.start()
            plain.append(queue.get())
            child.join()
            distributed.append(ray_round(cfg, args.warmup))
            print(f"round {round_}: plain {plain[-1][0]:.2f} steps/s, {plain[-1][1]:.0f} MB; "
                  f"Ray Train + DeepSpeed + teacher actor {distributed[-1][0]:.2f} steps/s, {distributed[-1][1]:.0f} MB "
                  f"(of which the teacher actor {distributed[-1][2]:.0f} MB)")
    speed = statistics.median(d[0] for d in distributed) / statistics.median(p[0] for p in plain)
    memory = statistics.median(d[1] for d in distributed) / statistics.median(p[1] for p in plain)
    print(f"toy arch, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), plain loop on {args.threads} "
          f"torch thread(s), median of {args.rounds} rounds")
    print(f"steps/s distributed / plain: {speed:.2f}x (target >= 0.8)")
    print(f"peak RSS distributed (worker + teacher actor) / plain: {memory:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
