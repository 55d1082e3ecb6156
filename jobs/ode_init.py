"""ODE-regression init of the causal student (CausVid / Causal Forcing stage): each block regresses the
teacher's ODE solution from the trajectory states stored by preprocessing, block-causal, one step per
trajectory point. Its export is the distillation's `model.student_path`.

    python jobs/ode_init.py --config configs/toy_ode_init.yaml
    ray job submit --working-dir . -- python jobs/ode_init.py --config configs/wan_1_3b_framewise.yaml

The student trains in a DeepSpeed engine on `ray.num_workers` Ray Train workers; checkpoints, resume and
export work as in jobs/distill.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` without an install

from jobs.cli import run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402


def main(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline import trainer
    from pipeline.failures import init_ray

    if args.export:
        print(f"exported: {trainer.export_latest(cfg, 'ode_init')}")
        return
    trainer.preflight(cfg, "ode_init")
    init_ray(cfg.ray.address)  # Ray's worker tracebacks go to the job's log, not above its one error line
    print(trainer.summary_text(trainer.launch(cfg, "ode_init")))


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", action="store_true", help="export the run's latest checkpoint and exit")


def plan(cfg: Config) -> dict:
    from pipeline.trainer import resource_plan

    return resource_plan(cfg, "ode_init")


def check(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.trainer import check_weights

    check_weights(cfg, "ode_init")


if __name__ == "__main__":
    run_main(main, __doc__, extra_args, plan, check)
