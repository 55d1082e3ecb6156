"""The whole product on the toy world in one command: prompts to graded one-step videos, on a local Ray.

    python jobs/quickstart.py                  # under 30 minutes on 2 CPU cores, into runs/quickstart
    python jobs/quickstart.py --fast           # about 3 minutes, smaller settings (CI), into runs/quickstart-fast
    python jobs/quickstart.py --out DIR distill.train.steps=800 ray.address=auto
    python jobs/quickstart.py --dry-run        # each stage's config, overrides and placement; starts nothing

Six stages, each the library code of its job (one Ray instance for all, one MLflow run each, in one
store, OUT/mlflow.db):

    preprocess  jobs/preprocess.run on configs/toy_preprocess.yaml: the shipped teacher's 25-step CFG
                latents and ODE trajectories for the grammar's 96 prompts -> OUT/data
    ode_init    jobs/ode_init.main on configs/toy_ode_init.yaml: the causal student regresses the ODE
    distill     jobs/distill.main on configs/toy_distill.yaml: One-Forcing (DMD + GAN), framewise, one step
    generate    jobs/generate.run: the one-step student's clips of the evaluation prompts -> OUT/videos/student
    teacher     the teacher's own multi-step sampler (its bundle's settings: 25 Euler steps, CFG 4) on the
                same prompts and the same starting noise -> OUT/videos/teacher
    evaluate    jobs/evaluate.evaluate, the toy grader, on both -> OUT/eval/{teacher,student}

and then a table: teacher vs one-step student, adherence, sharpness, temporal consistency, Frechet
distance, seconds per clip and first-frame latency (medians per clip, each model on one actor of
`generate.resources`). The toy grammar has only 96 single-object prompts, all used in training, so the
evaluation is held out in its noise: `generate.seed` 777, which preprocessing never draws.

Reruns: each finished stage leaves OUT/stages/<stage>/result.json (written atomically) with a key of its
settings and of the stages before it; a rerun with the same settings reuses it, and a stage that stopped
half-way resumes as its job does (preprocessing skips rows written, training resumes from its last
checkpoint, generation skips clips made). A stage whose settings changed runs again: training jobs then
continue their run (more steps continue it; other changes need a new --out). A failure prints one line,
naming the stage and its log (OUT/logs/<stage>.log: the stage's output and the traceback; Ray workers'
tracebacks go to OUT/logs/quickstart-*.log, as every job's do).

Overrides are `[stage.]section.key=value`: `distill.train.steps=800` sets one stage's config, and
`ray.address=auto` every config-driven stage's (preprocess, ode_init, distill, generate). Placement is
chosen in the distill stage's `ray` section: `distill.ray.teacher_actors` (1: the teacher on a Ray actor,
the toy default; 0: inside the Train worker) and `distill.ray.critic_placement` (`trainer`: the critic's
engine inside the Train worker, the toy default; `actors`: a critic actor group of
`distill.ray.critic_actors`, each with `distill.ray.critic_resources`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/quickstart.py` without an install

import yaml  # noqa: E402

from pipeline.config import Config, ConfigError, TrackingConfig, load_config  # noqa: E402
from pipeline.failures import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_BUG,
    cause,
    end_open_mlflow_run,
    install_signal_handlers,
    interrupt_signal,
    write_log,
)
from pipeline.stages import Runner, StageFailed, stage_tracker, write_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "ode_init", "distill", "generate", "teacher", "evaluate")
CONFIG_STAGES = ("preprocess", "ode_init", "distill", "generate")  # built from a Config (overrides apply)
CONFIG_FILES = {
    "preprocess": "configs/toy_preprocess.yaml",
    "ode_init": "configs/toy_ode_init.yaml",
    "distill": "configs/toy_distill.yaml",
    "generate": None,  # the distilled export carries its settings; overrides sit on top
}
GRADER_CONFIG = "configs/toy_teacher.yaml"  # the world the grader measures (as jobs/evaluate.py --config)
PROMPTS = "configs/prompts/toy_world.txt"  # the grammar's 96 single-object prompts
EVAL_SEED = 777  # the evaluation's noise; preprocessing uses data.seed 0

# The step counts keep the full run under 30 minutes on 2 CPU cores (the toy jobs' own configs take 600
# and 1000 steps, about 35 minutes together; bench/RESULTS.md): the ODE-init loss has flattened by step
# 300-400, and 600 distillation steps are 120 generator updates with the EMA (0.99) well settled.
FULL: dict[str, list[str]] = {
    "preprocess": [],
    "ode_init": ["train.steps=400"],
    "distill": ["train.steps=600"],
    "generate": [f"generate.seed={EVAL_SEED}"],
}
# --fast: every stage runs for real, on 16 training prompts and 8 evaluation prompts, with a few steps:
# it checks the plumbing, not the quality.
FAST_TRAIN_PROMPTS, FAST_EVAL_PROMPTS = 16, 8
FAST: dict[str, list[str]] = {
    "preprocess": ["data.teacher_steps=8", "data.shard_rows=16"],
    "ode_init": ["train.steps=8", "train.checkpoint_every=8", "tracking.sample_every=8"],
    "distill": ["train.steps=8", "train.checkpoint_every=8", "tracking.sample_every=8", "train.ema_start_step=0"],
    "generate": [f"generate.seed={EVAL_SEED}"],
}


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """Where everything goes and what each stage is told, resolved from the command line."""

    out: Path
    fast: bool
    overrides: dict[str, list[str]]  # stage -> the user's dotted overrides for it

    @property
    def store(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"

    def tracking(self) -> TrackingConfig:
        """For the stages without a Config of their own (evaluate)."""
        tracking = self.config("generate").tracking  # the user's tracking.* overrides included
        return dataclasses.replace(tracking, run_name="")

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def base(self, stage: str) -> list[str]:
        """The quickstart's own settings for a config stage: its paths under OUT, then --fast or full."""
        paths = {
            "preprocess": [f"data.output={self.path('data')}", f"data.prompts={self.train_prompts()}"],
            "ode_init": [f"data.output={self.path('data')}", f"train.storage_path={self.path('runs')}"],
            "distill": [f"data.output={self.path('data')}", f"train.storage_path={self.path('runs')}"],
            "generate": [],
        }[stage]
        tracking = [f"tracking.tracking_uri={self.store}", "tracking.experiment=quickstart"]
        return paths + tracking + (FAST if self.fast else FULL)[stage]

    def config(self, stage: str, extra: list[str] | None = None, base: dict[str, Any] | None = None) -> Config:
        """A stage's config: its YAML <- the quickstart's settings <- `extra` <- the user's overrides."""
        file = CONFIG_FILES[stage]
        overrides = self.base(stage) + (extra or []) + self.overrides.get(stage, [])
        try:
            return load_config(str(REPO / file) if file else None, overrides, base=base)
        except (ConfigError, yaml.YAMLError) as err:
            raise ConfigError(f"{stage} stage: {err}") from err

    def train_prompts(self) -> str:
        return str(self.path("prompts", "train.txt")) if self.fast else str(REPO / PROMPTS)

    def eval_prompts(self) -> str:
        return str(self.path("prompts", "eval.txt")) if self.fast else str(REPO / PROMPTS)

    def write_prompt_subsets(self) -> None:
        """--fast: spread subsets of the grammar's prompts (every k-th line covers colours, shapes and
        directions)."""
        if not self.fast:
            return
        lines = [line for line in (REPO / PROMPTS).read_text().splitlines() if line.strip()]
        for name, count in (("train.txt", FAST_TRAIN_PROMPTS), ("eval.txt", FAST_EVAL_PROMPTS)):
            step = len(lines) // count
            text = "".join(line + "\n" for line in lines[step // 2 :: step][:count])
            path = self.path("prompts", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)


def split_overrides(items: list[str]) -> dict[str, list[str]]:
    """`stage.section.key=value` goes to that stage, `section.key=value` to every config stage."""
    out: dict[str, list[str]] = {s: [] for s in CONFIG_STAGES}
    for item in items:
        key = item.partition("=")[0]
        head, _, rest = key.partition(".")
        if head in STAGES and rest:
            if head not in CONFIG_STAGES:
                raise ConfigError(f"override '{item}': the {head} stage takes no overrides "
                                  f"(stages with a config: {', '.join(CONFIG_STAGES)})")
            out[head].append(item.partition(".")[2])
        else:
            for stage in CONFIG_STAGES:
                out[stage].append(item)
    return out


# ----------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------


def preprocess_stage(cfg: Config, stage_dir: Path) -> dict[str, Any]:
    from jobs import preprocess

    started = time.perf_counter()
    tracker = stage_tracker(cfg.tracking, stage_dir, cfg.to_dict(), "preprocess")
    try:
        plan, written = preprocess.run(cfg)
        seconds = time.perf_counter() - started
        print("\n".join(preprocess.summary_lines(plan, written, seconds)))
        tracker.log_metrics({"lines": plan.lines, "bad_lines": len(plan.bad), "duplicates": plan.duplicates,
                             "already_written": plan.already_written, "written": written, "seconds": seconds}, step=0)
    finally:
        tracker.close()
    from pipeline import data

    return {"data": cfg.data.output, "rows": len(data.written_ids(cfg.data.output))}


def training_stage(cfg: Config, mode: str) -> dict[str, Any]:
    """jobs/ode_init.py or jobs/distill.py's own `main` (the distillation's starts the teacher pool)."""
    from jobs import distill, ode_init
    from pipeline import trainer

    job = ode_init if mode == "ode_init" else distill
    job.main(cfg, argparse.Namespace(export=False))
    run_dir = trainer.run_dir(cfg, mode)
    run_id_file = Path(run_dir) / "mlflow_run_id"
    return {"export": trainer.export_path(cfg, mode), "run_dir": run_dir, "steps": cfg.train.steps,
            "mlflow_run_id": run_id_file.read_text().strip() if run_id_file.exists() else ""}


def timing(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {"clips": len(rows), "seconds_per_clip": statistics.median(r["seconds"] for r in rows),
            "first_frame_seconds": statistics.median(r["first_frame_seconds"] for r in rows)}


def generate_stage(cfg: Config, export: str, prompts: str, out: Path, stage_dir: Path) -> dict[str, Any]:
    from jobs import generate
    from pipeline.planning import read_manifest

    started = time.perf_counter()
    tracker = stage_tracker(cfg.tracking, stage_dir, cfg.to_dict(), "generate")
    try:
        plan, new = generate.run(cfg, export, prompts, str(out))
        print("\n".join(generate.summary_lines(plan, new, time.perf_counter() - started)))
        measured = timing(read_manifest(str(out)))
        tracker.log_metrics(measured, step=0)
    finally:
        tracker.close()
    return {"videos": str(out), "label": "student: one step per frame", **measured}


def teacher_stage(
    bundle: str, negative: str, cfg: Config, student_videos: Path, out: Path, stage_dir: Path
) -> dict[str, Any]:
    """The teacher's clips of the student's rows (id, sample, prompt, seed), on one actor with the
    student generator's resources; the manifest is rewritten after each clip, so a rerun continues."""
    import ray
    from tqdm import tqdm

    from actors.generator import TeacherClips
    from pipeline.planning import existing_files, ray_resources, read_manifest, write_manifest

    wanted = [{k: r[k] for k in ("id", "sample", "prompt", "seed", "path")} for r in read_manifest(str(student_videos))]
    files = existing_files(str(out))
    done = [r for r in read_manifest(str(out)) if r["path"] in files and r["path"] in {w["path"] for w in wanted}]
    pending = [r for r in wanted if r["path"] not in {d["path"] for d in done}]
    params = {"bundle": bundle, "negative_prompt": negative, "clips": len(wanted), "resources": cfg.generate.resources}
    tracker = stage_tracker(cfg.tracking, stage_dir, params, "teacher")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if pending:
            options = ray_resources(cfg.generate.resources)  # as the student's generator actors
            actor = ray.remote(TeacherClips).options(**options).remote(bundle, negative, cfg.generate.fps, str(out))
            try:
                for row in tqdm(pending, desc="teacher", unit="clip"):
                    done.append(ray.get(actor.__call__.remote(row)))
                    write_manifest(str(out), done)
            finally:
                ray.kill(actor)
        write_manifest(str(out), done)
        measured = timing(read_manifest(str(out)))
        tracker.log_metrics(measured, step=0)
    finally:
        tracker.close()
    sampler = json.loads((Path(bundle) / "oneforce.json").read_text())["sampler"]
    label = f"teacher: {sampler['steps']} Euler steps, CFG {sampler['guidance']:g}"
    return {"videos": str(out), "label": label, **measured}


MEASURES = (  # (report key, column)
    ("adherence", "adherence"),
    ("sharpness", "sharpness"),
    ("temporal", "temporal consistency"),
    ("frechet", "Frechet distance"),
    ("seconds_per_clip", "s per clip"),
    ("first_frame_seconds", "first frames (s)"),
)


def evaluate_stage(settings: Settings, videos: dict[str, dict[str, Any]], stage_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.toyworld.videos import evaluate

    world = load_config(str(REPO / GRADER_CONFIG)).world
    params = {"grader_config": GRADER_CONFIG, "world": dataclasses.asdict(world)}
    tracker = stage_tracker(settings.tracking(), stage_dir, params, "evaluate")
    models: dict[str, Any] = {}
    try:
        for name, produced in videos.items():
            summary, rows = evaluate(Path(produced["videos"]), None, world)
            report = settings.path("eval", name)
            report.mkdir(parents=True, exist_ok=True)
            write_atomic(report / "report.json", json.dumps(summary, indent=1))
            pq.write_table(pa.Table.from_pylist(rows), report / "clips.parquet")
            measured = {k: produced[k] for k in ("label", "clips", "seconds_per_clip", "first_frame_seconds")}
            models[name] = {**summary, **measured, "videos": produced["videos"], "report": str(report)}
            tracker.log_metrics({f"{name}/{k}": v for k, v in models[name].items() if isinstance(v, (int, float))}, step=0)
        table = table_text(models)
        write_atomic(settings.path("table.md"), table + "\n")
        tracker.log_artifact(str(settings.path("table.md")))
    finally:
        tracker.close()
    return {"models": models, "table": table}


def table_text(models: dict[str, dict[str, Any]]) -> str:
    header = "| model | " + " | ".join(column for _, column in MEASURES) + " |"
    lines = [header, "|---" * (len(MEASURES) + 1) + "|"]
    for name in ("teacher", "student"):
        m = models[name]
        lines.append(f"| {m['label']} | " + " | ".join(f"{m[key]:.3f}" for key, _ in MEASURES) + " |")
    t, s = models["teacher"], models["student"]
    ratio = lambda key: s[key] / t[key] if t[key] else float("nan")  # noqa: E731
    lines.append("")
    lines.append(
        f"student / teacher: adherence {ratio('adherence'):.2f}x, time per clip {ratio('seconds_per_clip'):.3f}x "
        f"({1 / ratio('seconds_per_clip'):.1f}x faster), first frames {ratio('first_frame_seconds'):.3f}x; "
        f"{s['clips']} clips each, the same prompts and noise; times are medians on one actor each"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------


def quickstart(settings: Settings, runner: Runner) -> dict[str, Any]:
    """Every stage in order (each reused when finished with the same settings); the evaluate result."""
    from pipeline import trainer
    from pipeline.checkpoint import export_settings

    settings.write_prompt_subsets()
    pre = settings.config("preprocess")
    done = runner.run(
        "preprocess", [pre.to_dict(), Path(pre.data.prompts).read_text()],
        lambda d, changed: preprocess_stage(pre, d),
        f"the teacher's latents and ODE trajectories of {pre.data.prompts} -> {pre.data.output}",
    )
    ode = settings.config("ode_init")
    ode_done = runner.run(
        "ode_init", [ode.to_dict(), done["key"]], lambda d, changed: training_stage(ode, "ode_init"),
        f"ODE-regression init, {ode.train.steps} steps -> {trainer.export_path(ode, 'ode_init')}",
    )
    dist = settings.config("distill", [f"model.student_path={ode_done['export']}/transformer"])
    plan = trainer.resource_plan(dist, "distill")
    dist_done = runner.run(
        "distill", [dist.to_dict(), ode_done["key"]], lambda d, changed: training_stage(dist, "distill"),
        f"One-Forcing (DMD + GAN), one step per frame, {dist.train.steps} steps; teacher: {plan['teacher']}; "
        f"critic: {plan['critic']}",
    )

    export = dist_done["export"]
    gen = settings.config("generate", base=export_settings(export))
    prompts = settings.eval_prompts()
    student_videos, teacher_videos = settings.path("videos", "student"), settings.path("videos", "teacher")

    def generate_body(stage_dir: Path, changed: bool) -> dict[str, Any]:
        if changed:  # clips of an older student: generate.run would keep them
            shutil.rmtree(student_videos, ignore_errors=True)
        return generate_stage(gen, export, prompts, student_videos, stage_dir)

    gen_done = runner.run(
        "generate", [gen.to_dict(), dist_done["key"], Path(prompts).read_text()], generate_body,
        f"the one-step student's clips of {prompts} (seed {gen.generate.seed}) -> {student_videos}",
    )

    bundle = str(Path(pre.model.teacher_path).parent)  # the shipped bundle: transformer/, text encoder, codec

    def teacher_body(stage_dir: Path, changed: bool) -> dict[str, Any]:
        if changed:
            shutil.rmtree(teacher_videos, ignore_errors=True)
        return teacher_stage(bundle, pre.method.negative_prompt, gen, student_videos, teacher_videos, stage_dir)

    teacher_done = runner.run(
        "teacher", [bundle, pre.method.negative_prompt, gen.generate.resources, gen_done["key"]], teacher_body,
        f"the teacher's multi-step sampler on the same prompts and noise -> {teacher_videos}",
    )
    return runner.run(
        "evaluate", [GRADER_CONFIG, teacher_done["key"], gen_done["key"]],
        lambda d, changed: evaluate_stage(settings, {"teacher": teacher_done, "student": gen_done}, d),
        f"the toy grader ({GRADER_CONFIG}'s world) on both", ray=False,
    )


def dry_run(settings: Settings) -> None:
    """Each stage's config file and overrides, and where the distillation's roles run."""
    from pipeline import trainer

    for stage in CONFIG_STAGES:
        file = CONFIG_FILES[stage] or "(the distilled export's own settings)"
        print(f"{stage}: {file} " + " ".join(settings.base(stage) + settings.overrides.get(stage, [])))
    print("teacher: the teacher bundle's own sampler (its oneforce.json) on the generate stage's prompts and noise")
    print(f"evaluate: the toy grader, {GRADER_CONFIG}'s world")
    ode_export = trainer.export_path(settings.config("ode_init"), "ode_init")
    dist = settings.config("distill", [f"model.student_path={ode_export}/transformer"])
    print(yaml.safe_dump({"distill plan": trainer.resource_plan(dist, "distill")}, sort_keys=False), end="")
    print(f"MLflow store: {settings.store}")


def finish(settings: Settings, graded: dict[str, Any], seconds: float) -> None:
    models = graded["models"]
    print()
    print(graded["table"])
    print()
    print(f"videos:  {models['student']['videos']}  (one-step student)")
    print(f"         {models['teacher']['videos']}  (teacher)")
    print(f"grades:  {settings.path('eval')}/{{teacher,student}}/report.json, clips.parquet")
    print(f"MLflow:  mlflow ui --backend-store-uri {settings.store}")
    print(f"quickstart finished in {seconds:.0f} s ({settings.out})")


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output directory (default runs/quickstart, or runs/quickstart-fast with --fast)")
    parser.add_argument("--fast", action="store_true", help="smaller settings: a few minutes, checks the plumbing, not quality")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's settings and where the roles run, then exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, [stage.]section.key=value")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out or ("runs/quickstart-fast" if args.fast else "runs/quickstart")).expanduser().resolve()
    os.chdir(REPO)  # the configs name their files from the repository root
    try:
        settings = Settings(out=out, fast=args.fast, overrides=split_overrides(args.overrides))
        for stage in ("preprocess", "ode_init", "distill"):
            settings.config(stage)  # a bad override fails now, not after the stages before it ran
    except (ConfigError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return settings, args


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_args(argv)
    if args.dry_run:
        dry_run(settings)
        return
    install_signal_handlers()
    settings.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ONEFORCE_LOG_DIR", str(settings.path("logs")))  # pipeline/failures.py's logs, beside the stages'
    runner = Runner(settings.out, STAGES, settings.config("preprocess").ray.address)
    started = time.perf_counter()
    try:
        graded = quickstart(settings, runner)
    except BaseException as err:  # noqa: BLE001 - every way out gets one line (pipeline/failures.py)
        end_open_mlflow_run(err)
        signum = interrupt_signal(err)
        if signum is not None:
            print(f"interrupted: the finished stages are kept in {settings.out}; rerun the same command to continue", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)  # as run_guarded: Ray's exit hooks can abort a driver mid-stream
        if isinstance(err, SystemExit):
            raise
        if isinstance(err, StageFailed):
            found = cause(err.error)
            print(f"error: stage {err.stage} failed: {found.line()} (log: {err.log}; rerun to resume)", file=sys.stderr)
        else:  # between stages: the project's one line, the traceback in a log
            found = cause(err)
            print(f"error: {found.line()} (traceback: {write_log(err, 'quickstart')})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if found.bad_input else EXIT_BUG)
    finish(settings, graded, time.perf_counter() - started)
    runner.shutdown()


if __name__ == "__main__":
    main()
