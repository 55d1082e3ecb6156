"""One-Forcing distillation: the causal student learns one step per block from the teacher's CFG real
score (DMD) and a GAN on the critic's features, on self-forcing rollouts (DESIGN §3-§4).

    python jobs/distill.py --config configs/toy_distill.yaml [train.steps=300 ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/wan_1_3b_framewise.yaml
    python jobs/distill.py --config configs/toy_distill.yaml --export    # export the latest checkpoint

The teacher runs on `ray.teacher_actors` actors (0: inside each Train worker), the student in a DeepSpeed
engine on `ray.num_workers` Ray Train workers, the critic in its own engine beside it or, with
`ray.critic_placement: actors`, on a critic actor group of `ray.critic_actors`. Checkpoints go to
<train.storage_path>/<name>; rerunning the same command resumes from the latest one. At the end the EMA
student is exported (train.export_path, default <run>/export) for jobs/generate.py --checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

from jobs.cli import run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402


def main(cfg: Config, args: argparse.Namespace) -> None:
    from actors.roles import actor_roles
    from pipeline import trainer
    from pipeline.failures import init_ray

    if args.export:
        print(f"exported: {trainer.export_latest(cfg, 'distill')}")
        return
    trainer.preflight(cfg, "distill")
    cfg = trainer.with_absolute_paths(cfg)
    init_ray(cfg.ray.address)  # Ray's worker tracebacks go to the job's log, not above its one error line
    with actor_roles(cfg, "distill") as (teacher, critic):
        summary = trainer.launch(cfg, "distill", teacher, critic)
    print(trainer.summary_text(summary))


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", action="store_true", help="export the run's latest checkpoint and exit")


def plan(cfg: Config) -> dict:
    from pipeline.trainer import resource_plan

    return resource_plan(cfg, "distill")


def check(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.trainer import check_weights

    check_weights(cfg, "distill")


def report(cfg: Config) -> tuple[str, list[str]]:
    from pipeline.capacity import report as capacity_report

    return capacity_report(cfg)


if __name__ == "__main__":
    run_main(main, __doc__, extra_args, plan, check, report)
