"""The paper's claims in miniature, measured in the toy world (issue 13).

    python bench/claims.py                       # 4 variants x 3 seeds, 150 distillation steps each -> runs/claims
    python bench/claims.py --steps 300 --seeds 0 1 2 3
    python bench/claims.py --quick               # tiny settings, checks the plumbing in a few minutes -> runs/claims-quick
    python bench/claims.py --reuse runs/quickstart   # start from a finished quickstart's dataset and ODE init, if they match

Every variant starts from the same place: the shipped teacher, the quickstart's dataset (its 96 prompts)
and the quickstart's ODE-init student, made by `jobs/quickstart.py`'s own stages in OUT/shared (or
copied there from `--reuse DIR`, a finished quickstart whose settings are the same but for paths). The chunkwise variant needs an ODE init with its own
block size, trained here with the same settings. Each variant then distils for `--steps` steps, once per
seed (`train.seed`), with the toy distillation config and nothing else changed but what names it:

    oneforce   framewise, one step per frame, DMD + GAN (configs/toy_distill.yaml as it is)
    dmd        the same with method.gan_generator_weight=0 method.gan_discriminator_weight=0
    chunkwise  model.frames_per_block=3 (3 blocks of 3 frames, all carrying grad), from its own ODE init
    multistep  method.denoising_steps=[1000,750,500,250], generated with both inference schedules

Each distilled student (and the ODE-init starting points, for reference) generates the 96 prompts with
`pipeline.generation.ClipGenerator` on noise seed 777, which training never drew (all 96 prompts are
used in training, so the evaluation is held out in its noise, as the quickstart's), and the toy grader
(`pipeline.toyworld.videos.evaluate`, what jobs/evaluate.py runs, on configs/toy_teacher.yaml's world,
untouched) grades them. The teacher's own multi-step sampler (`pipeline.generation.TeacherClipGenerator`) makes
the same prompts from the same noise. Training
stability and cost come from each run's last checkpoint's state.json history.

Everything is keyed: runs/claims/units/<unit>/result.json holds a digest of the unit's settings and of
what it was built from; a rerun reuses finished units, a training run that stopped resumes from its last
checkpoint (its run directory is keyed by variant and seed), and one whose settings changed starts afresh. The results go to
runs/claims/claims.json and runs/claims/claims.md (the tables printed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/claims.py` without an install

from jobs import quickstart as qs  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.stages import Runner, StageFailed, digest, write_atomic  # noqa: E402

REPO = qs.REPO
EVAL_SEED = qs.EVAL_SEED  # 777: preprocessing draws data.seed 0 for every prompt
GRADER_CONFIG = qs.GRADER_CONFIG
VARIANTS: dict[str, list[str]] = {
    "oneforce": [],
    "dmd": ["method.gan_generator_weight=0", "method.gan_discriminator_weight=0"],
    "chunkwise": ["model.frames_per_block=3", "method.gradient_num_blocks=3"],
    "multistep": ["method.denoising_steps=[1000,750,500,250]"],
}
CHUNKWISE_ODE = ["model.frames_per_block=3", "method.gradient_num_blocks=3", "name=toy_ode_init_chunkwise"]
SCHEDULES = {"multistep": ("uniform", "first4then1")}  # the others: their export's own (uniform, one step)
QUALITY = ("adherence", "sharpness", "temporal", "frechet")
LOSSES = ("dmd", "gan_g", "critic_flow", "gan_d", "logits_real", "logits_fake")
# Budget (2 CPU cores): one toy distillation step is ~1 s on an idle box and 2 s beside other jobs, and
# each run adds ~45 s of start-up and export; 150 steps x 12 runs, plus the chunkwise ODE init and the
# generation, fit in about 60-75 minutes on a shared box.
DEFAULT_STEPS = 150
# The EMA is updated on generator steps only (every method.gen_every = 5), from train.ema_start_step 50:
# 150 steps give it 20 updates, after which the toy config's 0.99 still weighs the step-50 student 0.82.
# 0.95 (a horizon of ~20 updates, 100 steps) lets the export reflect the run; the same for every variant.
EMA_DECAY = 0.95
QUICK_STEPS = 4


# ----------------------------------------------------------------------------------------------------
# The pieces: training, clips, grades, history
# ----------------------------------------------------------------------------------------------------


def training_config(settings: qs.Settings, out: Path, mode: str, name: str, extra: list[str]) -> Config:
    """A stage config as the quickstart builds it (its YAML, data, tracking), with this bench's run folder,
    store and name on top."""
    store = f"sqlite:///{out / 'mlflow.db'}"
    return settings.config(mode, [f"train.storage_path={out / 'runs'}", f"tracking.tracking_uri={store}",
                                  "tracking.experiment=claims", f"name={name}", *extra])


def history_summary(cfg: Config, mode: str) -> dict[str, Any]:
    """From the run's last registered checkpoint: final losses (mean of the last 10% of the steps that
    logged each), NaN or
    infinite metrics, skipped updates, and the mean and median seconds per step (step 0, which warms up,
    left out; the mean is the cost of a step, generator steps included, the median that of a critic-only step)."""
    from pipeline import trainer

    checkpoint = trainer.latest_checkpoint(cfg, mode)
    history = json.loads((Path(checkpoint) / "state.json").read_text())["history"]
    numbers = [(k, v) for row in history for k, v in row.items() if isinstance(v, float)]
    final = {}
    for k in LOSSES:  # the generator's metrics exist on every gen_every-th step only
        logged = [r[k] for r in history if k in r]
        if logged:
            final[k] = statistics.fmean(logged[-max(1, len(logged) // 10):])
    return {
        "steps": len(history),
        "final": final,
        "non_finite": sum(1 for _, v in numbers if not math.isfinite(v)),
        "critic_skipped": sum(r.get("critic_skipped", 0.0) for r in history),
        "generator_skipped": sum(r.get("generator_skipped", 0.0) for r in history),
        "s_per_step": statistics.fmean(r["s_per_step"] for r in history[1:] or history),  # the run's cost per step
        "s_per_step_median": statistics.median(r["s_per_step"] for r in history[1:] or history),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in history),
        "checkpoint": checkpoint,
    }


def write_clips(make: Callable[[str, int], tuple[Any, Any]], prompts: list[str], out: Path, model_id: str) -> list[dict[str, Any]]:
    """`make(prompt, seed) -> (clip, Timing)` for every prompt at EVAL_SEED, as mp4 + manifest.jsonl."""
    from tqdm import tqdm

    from pipeline.video import write_mp4

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc=out.name, unit="clip")):
        clip, t = make(prompt, EVAL_SEED)
        path = f"{i:04d}.mp4"
        write_mp4(clip, str(out / path), fps=16)
        rows.append({"path": path, "prompt": prompt, "seed": EVAL_SEED, "seconds": t.seconds,
                     "first_frame_seconds": t.first_frame_seconds, "model_id": model_id})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def grade(videos: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from pipeline.toyworld.videos import evaluate

    world = load_config(str(REPO / GRADER_CONFIG)).world
    summary, _ = evaluate(videos, None, world)
    return {**summary, "clips": len(rows), "seconds_per_clip": statistics.median(r["seconds"] for r in rows),
            "first_frame_seconds": statistics.median(r["first_frame_seconds"] for r in rows), "videos": str(videos)}


def student_clips(export: str, schedule: str | None, prompts: list[str], out: Path) -> dict[str, Any]:
    """The student's clips (one torch thread, as one generation actor of 1 CPU) and their grade."""
    import torch

    from pipeline.checkpoint import export_settings
    from pipeline.generation import ClipGenerator

    torch.set_num_threads(1)
    overrides = [f"method.inference_schedule={schedule}"] if schedule else []
    gen = ClipGenerator.load(export, load_config(base=export_settings(export), overrides=overrides))
    rows = write_clips(gen.timed, prompts, out, export)
    return {**grade(out, rows), "schedule": gen.settings.schedule, "steps": gen.settings.steps}


def teacher_clips(pre: Config, prompts: list[str], out: Path) -> dict[str, Any]:
    import torch

    from pipeline.generation import TeacherClipGenerator

    torch.set_num_threads(1)
    bundle = str(Path(pre.model.teacher_path).parent)
    teacher = TeacherClipGenerator(bundle, pre.method.negative_prompt)
    rows = write_clips(teacher.timed, prompts, out, teacher.model_id)
    return {**grade(out, rows), "label": teacher.model_id}


# ----------------------------------------------------------------------------------------------------
# The bench
# ----------------------------------------------------------------------------------------------------


PATH_KEYS = ("data.output", "data.prompts", "train.storage_path", "tracking.")  # where, not what


def adopt(settings: qs.Settings, source: Path) -> None:
    """Start from another quickstart's dataset and ODE-init export (e.g. one run elsewhere) when every
    setting that made them equals this bench's: the dataset's `config_hash` (jobs/preprocess.py's
    `preprocess_settings`) and its prompt ids, and the ODE-init run's MLflow params but for paths, and its
    step. They are copied under the shared folder with the quickstart's own stage records, so its Runner
    reuses them; anything that differs is said, and the stages then run here instead."""
    import mlflow

    from jobs.preprocess import preprocess_settings
    from pipeline import data, trainer
    from pipeline.tracking import _flatten

    if (settings.path("stages", "ode_init", "result.json")).exists():
        return
    pre, ode = settings.config("preprocess"), settings.config("ode_init")
    other = qs.Settings(out=source, fast=settings.fast, overrides=settings.overrides)
    theirs_ode = other.config("ode_init")
    export = Path(trainer.export_path(theirs_ode, "ode_init"))
    problems = []
    info = json.loads((source / "data" / "_dataset.json").read_text()) if (source / "data" / "_dataset.json").exists() else {}
    if info.get("config_hash") != data.config_hash(preprocess_settings(pre)):
        problems.append(f"dataset settings differ ({info.get('config_hash')} vs {data.config_hash(preprocess_settings(pre))})")
    prompts = [line for line in Path(pre.data.prompts).read_text().splitlines() if line.strip()]
    if info and data.written_ids(str(source / "data")) != {data.prompt_id(p, pre.data.seed) for p in prompts}:
        problems.append("dataset rows differ from the prompts")
    run_id_file = Path(trainer.run_dir(theirs_ode, "ode_init")) / "mlflow_run_id"
    if not (export / "oneforce.json").exists() or not run_id_file.exists():
        problems.append(f"no ODE-init export and run at {export.parent}")
    else:
        params = mlflow.MlflowClient(f"sqlite:///{source / 'mlflow.db'}").get_run(run_id_file.read_text().strip()).data.params
        ours, defaults = _flatten(ode.to_dict()), _flatten(Config().to_dict())
        # A key their run lacks is a setting added since; it is equal if ours is still its default.
        differ = [k for k in ours if not k.startswith(PATH_KEYS) and params.get(k, defaults.get(k)) != ours[k]]
        step = json.loads((export / "oneforce.json").read_text())["source"]["step"]
        if differ or step != ode.train.steps:
            problems.append(f"ODE init differs: {differ[:5]}, step {step} vs {ode.train.steps}")
    if problems:
        print(f"not reusing {source}: " + "; ".join(problems), flush=True)
        return
    print(f"reusing {source}'s dataset and ODE-init export (settings equal but for paths)", flush=True)
    shutil.copytree(source / "data", settings.path("data"), dirs_exist_ok=True)
    shutil.copytree(export, trainer.export_path(ode, "ode_init"), dirs_exist_ok=True)
    pre_key = digest([pre.to_dict(), Path(pre.data.prompts).read_text()])
    records = {
        "preprocess": (pre_key, {"data": pre.data.output, "rows": len(prompts), "adopted_from": str(source / "data")}),
        "ode_init": (digest([ode.to_dict(), pre_key]), {"export": trainer.export_path(ode, "ode_init"), "steps": ode.train.steps,
                     "run_dir": trainer.run_dir(ode, "ode_init"), "adopted_from": str(export)}),
    }
    for stage, (key, result) in records.items():
        write_atomic(settings.path("stages", stage, "result.json"), json.dumps(
            {"stage": stage, "key": key, "seconds": 0.0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}, indent=1))


def run_all(args: argparse.Namespace, out: Path, shared: Path) -> dict[str, Any]:
    from pipeline import trainer

    settings = qs.Settings(out=shared, fast=args.quick, overrides={s: [] for s in qs.CONFIG_STAGES})
    runner = Runner(settings.out, qs.STAGES)  # the quickstart's own stages, in the shared folder
    units = Runner(out, folder="units")  # this bench's: out/units/<name>/result.json
    os.environ.setdefault("ONEFORCE_LOG_DIR", str(out / "logs"))

    # The shared starting point: the quickstart's own preprocess and ODE-init stages (reused by its keys),
    # adopted from another quickstart's output when its settings are ours.
    settings.write_prompt_subsets()
    if args.reuse:
        adopt(settings, Path(args.reuse).expanduser().resolve())
    pre = settings.config("preprocess")
    pre_done = runner.run("preprocess", [pre.to_dict(), Path(pre.data.prompts).read_text()],
                          lambda d, changed: qs.preprocess_stage(pre, d), f"the quickstart's dataset -> {pre.data.output}")
    ode = settings.config("ode_init")
    ode_done = runner.run("ode_init", [ode.to_dict(), pre_done["key"]], lambda d, changed: qs.training_stage(ode, "ode_init"),
                          f"the quickstart's ODE init, {ode.train.steps} steps")
    starts = {"framewise": ode_done}
    if "chunkwise" in args.variants:  # its own starting point, trained only when asked for
        chunk_ode = training_config(settings, out, "ode_init", "toy_ode_init_chunkwise", CHUNKWISE_ODE)
        starts["chunkwise"] = units.run(
            "ode_init-chunkwise", [chunk_ode.to_dict(), pre_done["key"]], lambda d, changed: qs.training_stage(chunk_ode, "ode_init"),
            f"ODE init with 3 frames per block, {chunk_ode.train.steps} steps (the quickstart's settings otherwise)", ray=True)

    prompts_file = settings.eval_prompts()
    prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    eval_material = [prompts, EVAL_SEED, GRADER_CONFIG]
    results: dict[str, Any] = {"steps": args.steps, "seeds": args.seeds, "eval_prompts": prompts_file,
                               "eval_seed": EVAL_SEED, "shared": str(shared), "runs": {}, "evals": {}}
    results["evals"]["teacher"] = units.run(
        "eval-teacher", [pre_done["key"], pre.model.teacher_path, eval_material],
        lambda d, changed: teacher_clips(pre, prompts, out / "videos" / "teacher"), "the teacher's multi-step sampler, graded", ray=False)
    for start, done in starts.items():
        results["evals"][f"ode_init-{start}"] = units.run(
            f"eval-ode_init-{start}", [done["key"], eval_material],
            lambda d, changed, done=done, start=start: student_clips(done["export"], None, prompts, out / "videos" / f"ode_init-{start}"),
            f"the {start} ODE-init student (the starting point), graded", ray=False)

    quick = [f"train.checkpoint_every={args.steps}", "train.ema_start_step=0"] if args.quick else []
    for seed in args.seeds:  # seed-major: an interrupted bench has every variant at the first seeds
        for variant in args.variants:
            start = starts["chunkwise" if variant == "chunkwise" else "framewise"]
            name = f"claims_{variant}_s{seed}"
            cfg = training_config(settings, out, "distill", name, [
                f"model.student_path={start['export']}/transformer", f"train.steps={args.steps}", f"train.seed={seed}",
                f"tracking.sample_every={args.steps}", f"train.ema_decay={EMA_DECAY}", *quick, *VARIANTS[variant]])

            def train(d: Path, changed: bool, cfg: Config = cfg) -> dict[str, Any]:
                if changed:  # its checkpoints were made with other settings: start the run afresh
                    shutil.rmtree(trainer.run_dir(cfg, "distill"), ignore_errors=True)
                return {**qs.training_stage(cfg, "distill"), **history_summary(cfg, "distill")}

            run = units.run(f"distill-{variant}-s{seed}", [cfg.to_dict(), start["key"]], train,
                            f"{variant}, seed {seed}, {args.steps} steps -> {trainer.run_dir(cfg, 'distill')}", ray=True)
            run = {**run, **history_summary(cfg, "distill")}  # read again: a reused run gets today's summary
            results["runs"][f"{variant}-s{seed}"] = {"variant": variant, "seed": seed, "overrides": VARIANTS[variant], **run}
            for schedule in SCHEDULES.get(variant, (None,)):
                label = f"{variant}-s{seed}" + (f"-{schedule}" if schedule else "")
                results["evals"][label] = units.run(
                    f"eval-{label}", [run["key"], schedule, eval_material],
                    lambda d, changed, run=run, schedule=schedule, label=label: student_clips(run["export"], schedule, prompts, out / "videos" / label),
                    f"{label}: clips of {len(prompts)} prompts (seed {EVAL_SEED}), graded", ray=False)
            write_atomic(out / "claims.json", json.dumps(results, indent=1))
            write_atomic(out / "claims.md", tables(results) + "\n")
    runner.shutdown()
    units.shutdown()
    return results


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 3) -> str:
    """mean ± sample std (n - 1), then the per-seed values; one seed's value alone (no spread to show)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean = statistics.fmean(values)
    std = statistics.stdev(values)
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({each})"


def per_seed(results: dict[str, Any], variant: str, key: str, schedule: str | None = None, source: str = "evals") -> list[float]:
    out = []
    for seed in results["seeds"]:
        label = f"{variant}-s{seed}" + (f"-{schedule}" if schedule and source == "evals" else "")
        row = results[source].get(label)
        if row is not None:
            value = row["final"].get(key) if key in LOSSES else row.get(key)
            if value is not None:
                out.append(float(value))
    return out


def tables(r: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in r["seeds"])
    teacher = r["evals"].get("teacher", {})
    lines = [f"{r['steps']} distillation steps per run, seeds {seeds} (mean ± sample std (n-1), then each seed's value); "
             f"{teacher.get('clips', '?')} prompts of {Path(r['eval_prompts']).name}, noise seed {r['eval_seed']} "
             "(never drawn in training), graded by the toy grader."]

    def row(label: str, variant: str, keys: tuple[str, ...], schedule: str | None = None) -> str:
        return f"| {label} | " + " | ".join(spread(per_seed(r, variant, k, schedule)) for k in keys) + " |"

    def paired(label: str, a: tuple[str, str | None], b: tuple[str, str | None], keys: tuple[str, ...]) -> str:
        """a - b per seed (the same seed: the same data order, timesteps and noise draws in training)."""
        cells = []
        for k in keys:
            both = [s for s in r["seeds"] if all(f"{v}-s{s}" + (f"-{sch}" if sch else "") in r["evals"] for v, sch in (a, b))]
            value = lambda v, sch, s: r["evals"][f"{v}-s{s}" + (f"-{sch}" if sch else "")][k]  # noqa: E731
            cells.append(spread([value(*a, s) - value(*b, s) for s in both]))
        return f"| {label} | " + " | ".join(cells) + " |"

    def fixed(label: str, ev: dict[str, Any], keys: tuple[str, ...]) -> str:
        return f"| {label} | " + " | ".join(f"{ev[k]:.3f}" if k in ev else "-" for k in keys) + " |"

    head = lambda cols: ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]  # noqa: E731
    cols = ("adherence", "sharpness", "temporal consistency", "Frechet distance")
    lines += ["", "Claim 1: one-step framewise, DMD + GAN (One-Forcing) vs DMD only", ""] + head(cols)
    lines.append(fixed("teacher (reference)", teacher, QUALITY))
    lines.append(fixed("ODE init (the starting point)", r["evals"].get("ode_init-framewise", {}), QUALITY))
    lines.append(row("One-Forcing (DMD + GAN)", "oneforce", QUALITY))
    lines.append(row("DMD only", "dmd", QUALITY))
    lines.append(paired("One-Forcing - DMD only, per seed", ("oneforce", None), ("dmd", None), QUALITY))

    lines += ["", "Claim 2: one-step One-Forcing vs the teacher's multi-step sampler (target: adherence >= 0.9x)", ""]
    ratios = [a / teacher["adherence"] for a in per_seed(r, "oneforce", "adherence")] if teacher.get("adherence") else []
    speed = [s / teacher["seconds_per_clip"] for s in per_seed(r, "oneforce", "seconds_per_clip")] if teacher else []
    lines += head(("adherence", "s per clip"))
    lines.append(fixed(teacher.get("label", "teacher"), teacher, ("adherence", "seconds_per_clip")))
    lines.append(row("One-Forcing, one step per frame", "oneforce", ("adherence", "seconds_per_clip")))
    lines.append(f"| student / teacher | {spread(ratios)} | {spread(speed)} |")

    lines += ["", "Claim 3: framewise vs chunkwise (3 frames per block), one step: stability and cost", ""]
    cols3 = ("final dmd", "final critic flow", "final gan_d", "non-finite metrics", "skipped updates", "s per step", "adherence", "Frechet")
    lines += head(cols3)
    for label, variant in (("framewise (One-Forcing)", "oneforce"), ("chunkwise", "chunkwise")):
        runs = [r["runs"][f"{variant}-s{s}"] for s in r["seeds"] if f"{variant}-s{s}" in r["runs"]]
        skipped = [x["critic_skipped"] + x["generator_skipped"] for x in runs]
        lines.append(f"| {label} | " + " | ".join([
            spread(per_seed(r, variant, "dmd", source="runs")), spread(per_seed(r, variant, "critic_flow", source="runs")),
            spread(per_seed(r, variant, "gan_d", source="runs")), str(sum(x["non_finite"] for x in runs)),
            f"{sum(skipped):g}", spread(per_seed(r, variant, "s_per_step", source="runs")),
            spread(per_seed(r, variant, "adherence")), spread(per_seed(r, variant, "frechet"))]) + " |")
    lines.append(fixed("ODE init, chunkwise (its start)", r["evals"].get("ode_init-chunkwise", {}), ("",) * 6 + ("adherence", "frechet")))

    lines += ["", "Claim 4: inference schedules on the same multi-step student (trained on [1000, 750, 500, 250])", ""]
    cols4 = ("adherence", "sharpness", "temporal consistency", "Frechet distance", "s per clip", "first frames (s)")
    keys4 = QUALITY + ("seconds_per_clip", "first_frame_seconds")
    lines += head(cols4)
    for schedule in SCHEDULES["multistep"]:
        lines.append(row(f"multistep student, {schedule}", "multistep", keys4, schedule))
    lines.append(paired("first4then1 - uniform, per seed", ("multistep", "first4then1"), ("multistep", "uniform"), keys4))

    lines += ["", "Training cost of every variant (the run's history: mean s per step over steps 1.., generator steps included; the run's "
              "wall time with Ray Train's start-up and the export; peak RSS of the Train worker)", ""]
    lines += head(("s per step", "run wall time (s)", "peak RSS (MB)", "non-finite metrics", "skipped updates"))
    for variant in VARIANTS:
        runs = [r["runs"][f"{variant}-s{s}"] for s in r["seeds"] if f"{variant}-s{s}" in r["runs"]]
        if runs:
            lines.append(f"| {variant} | " + " | ".join([
                spread([x["s_per_step"] for x in runs]), spread([x["seconds"] for x in runs if "seconds" in x], 0),
                spread([x["peak_rss_mb"] for x in runs], 0), str(sum(x["non_finite"] for x in runs)),
                f"{sum(x['critic_skipped'] + x['generator_skipped'] for x in runs):g}"]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help=f"distillation steps per run (default {DEFAULT_STEPS}; --quick {QUICK_STEPS})")
    parser.add_argument("--seeds", type=int, nargs="+", help="train.seed of each run (default 0 1 2; --quick 0 1)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny settings (16 training prompts, 8 for grading, a few steps): the plumbing, not the claims")
    parser.add_argument("--out", help="default runs/claims (runs/claims-quick with --quick)")
    parser.add_argument("--shared", help="where the quickstart's preprocess and ODE-init stages put the starting point "
                                         "of every run (default OUT/shared)")
    parser.add_argument("--reuse", help="a finished quickstart's output folder: its dataset and ODE init are copied "
                                        "to the shared folder if their settings equal this bench's")
    args = parser.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out or ("runs/claims-quick" if args.quick else "runs/claims")).expanduser().resolve()
    shared = Path(args.shared).expanduser().resolve() if args.shared else out / "shared"
    os.chdir(REPO)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        results = run_all(args, out, shared)
    except StageFailed as err:
        print(f"error: {err.stage} failed: {qs.cause(err.error).line()} (log: {err.log}; rerun to resume)", file=sys.stderr)
        sys.exit(1)
    print()
    print(tables(results))
    print(f"\nclaims finished in {time.perf_counter() - started:.0f} s; {out / 'claims.md'}, {out / 'claims.json'}")


if __name__ == "__main__":
    main()
