"""The per-worker loop Ray Train runs for ODE init and distillation, and the driver side that starts it.

Each Train worker owns the student's DeepSpeed engine (and, with `ray.critic_placement: trainer`, the
critic's), reads its shard of the preprocessed Parquet with `ray.train.get_dataset_shard`, runs the step
functions of `pipeline.distill`, and every `train.checkpoint_every` steps writes one checkpoint directory:

    student/, critic/        DeepSpeed's own shards (every rank writes its part)
    ema.safetensors          the fp32 EMA of the student (distillation, once it started): what an export holds
    weights.safetensors      the student's full weights, only while there is no EMA (what an export holds then)
    student_config.json      the student's architecture (diffusers config)
    rng/rank<r>.json         each rank's torch RNG states (CPU and CUDA)
    state.json               the next step, the data position, and the history of every step's metrics
                             (averaged over ranks) with the ids each rank read

and hands it to `ray.train.report`, which puts it under `<train.storage_path>/<run name>/`. Relaunching
the same run name restores the latest checkpoint (Ray Train's own run restoration) and continues exactly:
every random draw is seeded by (run seed, step, sample index), and the data iterator skips the batches
already consumed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline import data
from pipeline.checkpoint import decode_rng, encode_rng
from pipeline.config import Config, build
from pipeline.distill import (
    EMA,
    LocalCritic,
    LocalTeacher,
    RealScore,
    StepContext,
    distill_step,
    global_indices,
    ode_init_step,
    rows_to_batch,
)
from pipeline.distributed import gather_ids, mean_over_ranks, peak_rss_mb
from pipeline.engines import DeepSpeedOptimised
from pipeline.models.loading import load_critic, load_student, load_teacher
from pipeline.storage import is_url

Mode = Literal["distill", "ode_init"]
STATE_FILE, WEIGHTS_FILE, EMA_FILE = "state.json", "weights.safetensors", "ema.safetensors"
ARCHITECTURE_FILE = "student_config.json"  # the student's diffusers config, for exports


@dataclass
class RunSpec:
    """What the driver hands every worker (pickled once into `train_loop_config`)."""

    config: dict[str, Any]
    mode: Mode
    info: data.DatasetInfo
    negative: torch.Tensor  # the negative prompt's embedding (L, D)
    teacher: RealScore | None = None  # a teacher actor pool; None = a teacher inside each worker
    critic: Any = None  # an actors.critic.CriticGroup (ray.critic_placement: actors); None = in each worker
    tracking_uri: str = ""  # empty: no tracking
    mlflow_run_id: str = ""
    samples: dict[str, Any] = field(default_factory=dict)  # fixed prompts for sample videos: id, prompt, text


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def decode_rows(table, info: data.DatasetInfo, with_trajectory: bool) -> dict[str, Any]:
    rows = data.decode_batch(table, info)
    if with_trajectory:
        rows["trajectory"] = data.tensor_values(table.column("trajectory"), info.trajectory.dtype)
    return rows


def shard_batches(shard, info: data.DatasetInfo, batch_size: int, skip: int, with_trajectory: bool) -> Iterator[dict[str, Any]]:
    """Batches of the worker's shard, epoch after epoch, the first `skip` batches passed over (resume)."""
    consumed = 0
    while True:
        produced = False
        for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True):
            produced = True
            consumed += 1
            if consumed > skip:
                yield decode_rows(table, info, with_trajectory)
        if not produced:
            raise ValueError(f"a worker's share of the dataset holds fewer than train.batch_size={batch_size} rows")


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    cuda = [encode_rng(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"cpu": encode_rng(torch.get_rng_state()), "cuda": cuda}


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(decode_rng(state["cpu"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_rng(s) for s in state["cuda"]])


@dataclass
class WorkerState:
    step: int = 0  # the next step to run
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(
    directory: str, state: WorkerState, engines: dict[str, DeepSpeedOptimised], ema: EMA | None, rank: int
) -> None:
    """Every rank writes its DeepSpeed shards and RNG; rank 0 the EMA (or, before it starts, the student's
    full weights: one of the two, never the same tensors twice), the architecture and the state."""
    for name, engine in engines.items():
        engine.engine.save_checkpoint(directory, tag=name)
    student = engines["student"]
    weights = student.full_state() if ema is None else ema.full_state(student)  # a collective under ZeRO
    os.makedirs(f"{directory}/rng", exist_ok=True)
    Path(f"{directory}/rng/rank{rank}.json").write_text(json.dumps(_rng_state()))
    if rank == 0:
        save_file(weights, f"{directory}/{WEIGHTS_FILE if ema is None else EMA_FILE}")
        Path(f"{directory}/{ARCHITECTURE_FILE}").write_text(json.dumps(dict(engines["student"].module.config)))
        Path(f"{directory}/{STATE_FILE}").write_text(json.dumps({"step": state.step, "history": state.history}))


def restore_checkpoint(directory: str, engines: dict[str, DeepSpeedOptimised], rank: int) -> tuple[WorkerState, EMA | None]:
    for name, engine in engines.items():
        path, _ = engine.engine.load_checkpoint(directory, tag=name, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"checkpoint {directory} has no DeepSpeed state for the {name}")
    raw = json.loads(Path(f"{directory}/{STATE_FILE}").read_text())
    rng = Path(f"{directory}/rng/rank{rank}.json")
    if rng.exists():  # a relaunch on more ranks than before starts their RNG fresh
        _restore_rng(json.loads(rng.read_text()))
    ema_file = f"{directory}/{EMA_FILE}"
    ema = EMA.restore(engines["student"], load_file(ema_file)) if os.path.exists(ema_file) else None
    return WorkerState(step=raw["step"], history=raw["history"]), ema


# ----------------------------------------------------------------------------------------------------
# The worker loop
# ----------------------------------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: the run's spec comes through the object store (see `fit`)."""
    import ray

    train_worker(ray.get(config["spec"]))


def train_worker(spec: RunSpec) -> None:
    """One Train worker's run: build the engines, restore, run the steps, checkpoint."""
    import ray.train
    import ray.train.torch

    cfg: Config = build(Config, spec.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    student = load_student(cfg.model, device, for_ode_init=spec.mode == "ode_init", checkpointing=cfg.train.gradient_checkpointing)
    engines = {"student": DeepSpeedOptimised(student, cfg.train.lr, cfg, world)}
    checkpoint = ray.train.get_checkpoint()
    step_ctx = None
    if spec.mode == "distill":
        if spec.critic is not None:  # the critic actor group: rank 0 forms it from the same checkpoint
            if rank == 0:
                spec.critic.form(None if checkpoint is None else f"{run_dir(cfg, spec.mode)}/{Path(checkpoint.path).name}")
            dist.barrier()
            critic = spec.critic
        else:
            engines["critic"] = DeepSpeedOptimised(load_critic(cfg, device), cfg.train.critic_lr, cfg, world)
            critic = LocalCritic(engines["critic"], cfg.method)
        teacher = spec.teacher or LocalTeacher(load_teacher(cfg.model, device), spec.negative.to(device), cfg.method.real_guidance)
        step_ctx = StepContext(cfg, engines["student"], teacher, critic)

    state, ema = WorkerState(), None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, ema = restore_checkpoint(directory, engines, rank)
    if step_ctx is not None:
        step_ctx.ema = ema

    batch_size = cfg.train.batch_size
    batches = shard_batches(
        ray.train.get_dataset_shard("train"), spec.info, batch_size, skip=state.step, with_trajectory=spec.mode == "ode_init"
    )
    tracker = _worker_tracker(spec) if rank == 0 else None
    progress = _progress(cfg, state.step) if rank == 0 else None
    trajectory_timesteps = list(spec.info.trajectory_timesteps)
    for step in range(state.step, cfg.train.steps):
        rows = next(batches)
        batch = rows_to_batch(rows, global_indices(step, rank, world, batch_size))
        batch.text, batch.latent = batch.text.to(device), batch.latent.to(device)
        if batch.trajectory is not None:
            batch.trajectory = batch.trajectory.to(device)
        started = time.perf_counter()
        if step_ctx is not None:
            metrics = distill_step(step_ctx, batch, step)
        else:
            metrics = ode_init_step(engines["student"], batch, step, cfg, trajectory_timesteps)
        seconds = time.perf_counter() - started
        metrics = mean_over_ranks({**metrics, "s_per_step": seconds, "peak_rss_mb": peak_rss_mb()})
        metrics["samples_per_s"] = batch_size * world / metrics["s_per_step"]
        state.history.append({"step": step, "time": time.time(), **metrics, "ids": gather_ids(batch.ids)})
        state.step = step + 1
        if tracker is not None:
            if step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                tracker.log_metrics(metrics, step)
            shown = " ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k in ("dmd", "critic_flow", "ode_loss", "s_per_step"))
            progress.set_description(f"{cfg.name} {shown}")
            progress.update(1)
        current_ema = step_ctx.ema if step_ctx is not None else None
        if spec.samples and (state.step % cfg.tracking.sample_every == 0 or state.step == cfg.train.steps):  # none at 0
            _log_samples(cfg, spec, engines["student"], current_ema, tracker, state.step, device)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
            name = checkpoint_name(state.step)
            # The critic group writes its shards into the same directory while the workers write theirs
            # (at true width each write took 15-20 s on a 2-core machine; one after the other, twice that).
            critic_saved = spec.critic.start_save(f"{run_dir(cfg, spec.mode)}/{name}") if spec.critic is not None and rank == 0 else None
            with checkpoint_directory(f"{run_dir(cfg, spec.mode)}/{name}") as (directory, upload):
                save_checkpoint(directory, state, engines, current_ema, rank)
                if critic_saved is not None:
                    critic_saved()  # a reported checkpoint is a whole one
                ray.train.report(
                    {"step": state.step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(directory),
                    checkpoint_dir_name=name, checkpoint_upload_mode=upload,
                )
    if progress is not None:
        progress.close()  # a line on stdout that tells the driver to drop the bar; Ray Train kills this
        sys.stdout.flush()  # process when the loop returns, and a buffered line would leave the bar drawn


@contextmanager
def checkpoint_directory(target: str) -> Iterator[tuple[str, Any]]:
    """Where every rank writes a checkpoint, and how Ray Train then registers it. On a local (or mounted)
    storage path the shards go straight into the run's directory and Ray Train only registers them: its
    copy from a temporary folder cost 6-9 s per true-width checkpoint, and twice the disk meanwhile.
    On s3:// DeepSpeed writes to local disk and Ray Train uploads. A directory that a killed run left
    half-written is never registered, so never resumed from; a rerun writes over it."""
    from ray.train import CheckpointUploadMode

    if not is_url(target):
        os.makedirs(target, exist_ok=True)
        yield target, CheckpointUploadMode.NO_UPLOAD
    else:
        with tempfile.TemporaryDirectory(prefix="oneforce-ckpt-") as directory:
            yield directory, CheckpointUploadMode.SYNC


def checkpoint_name(step: int) -> str:
    """A checkpoint's directory in the run: named by the step after it, so the critic group (on other
    nodes) can write into the directory the Train workers report next."""
    return f"checkpoint_{step:08d}"


def _log_samples(
    cfg: Config, spec: RunSpec, student: DeepSpeedOptimised, ema: EMA | None, tracker, step: int, device: torch.device
) -> None:
    """Render the fixed samples with the EMA (or, before it starts, the student) and log them. Every
    rank takes part in gathering the weights (ZeRO-3); rank 0 renders on its own device."""
    from pipeline.samples import render, write_samples

    weights = ema.full_state(student) if ema is not None else student.full_state()  # a collective under ZeRO
    if tracker is None:
        return
    clips = render(dict(student.module.config), weights, spec.samples, cfg, device)
    with tempfile.TemporaryDirectory(prefix="oneforce-samples-") as folder:
        for path in write_samples(clips, folder, step, cfg.generate.fps):
            tracker.log_artifact(str(path), "samples")


def _worker_tracker(spec: RunSpec):
    """Rank 0's handle on the driver's MLflow run; a tracking server this node cannot reach fails the
    run here, before the first step, rather than at the first metric."""
    import socket

    from pipeline.tracking import AttachedTracker, NullTracker, check_reachable

    if not spec.tracking_uri or not spec.mlflow_run_id:
        return NullTracker()
    check_reachable(spec.tracking_uri, f"Train worker rank 0 on {socket.gethostname()}")
    return AttachedTracker(spec.tracking_uri, spec.mlflow_run_id)


def _progress(cfg: Config, start: int):
    """Rank 0's bar of steps, drawn in place on the driver by Ray's tqdm_ray (a worker's plain tqdm
    reaches the driver's terminal as a new line per update)."""
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(desc=cfg.name, total=cfg.train.steps, unit="step", flush_interval_s=1.0)
    bar.n = start
    return bar


# ----------------------------------------------------------------------------------------------------
# The driver side
# ----------------------------------------------------------------------------------------------------


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or cfg.name


def storage_root(cfg: Config) -> str:
    """`train.storage_path` with `~` expanded for local paths (Ray Train wants absolute paths)."""
    path = cfg.train.storage_path
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def run_dir(cfg: Config, mode: Mode) -> str:
    """<train.storage_path>/<name>/<mode>: one config's ODE init and distillation never share a run."""
    return f"{storage_root(cfg).rstrip('/')}/{run_name(cfg)}/{mode}"


def with_absolute_paths(cfg: Config) -> Config:
    """The config with relative local paths made absolute: Train workers and actors do not run in the
    driver's working directory."""
    import dataclasses

    def absolute(path: str) -> str:
        return os.path.abspath(path) if path and not is_url(path) and not path.startswith("patch:") else path

    model = dataclasses.replace(cfg.model, **{k: absolute(getattr(cfg.model, k)) for k in (
        "teacher_path", "student_init_path", "student_path", "critic_path", "text_encoder_path", "codec")})
    # The run directory too: the workers and the critic actors name checkpoint directories by it.
    train = dataclasses.replace(cfg.train, storage_path=storage_root(cfg), export_path=absolute(cfg.train.export_path))
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, output=absolute(cfg.data.output)), train=train)


def ray_storage(root: str):
    """(storage_path, storage_filesystem) for Ray Train: URLs go through the same fsspec filesystem as
    every other s3:// path of the project (credentials and endpoint from the same environment)."""
    if not is_url(root):
        return root, None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(root)
    return path, PyFileSystem(FSSpecHandler(fs))


def resource_plan(cfg: Config, mode: Mode) -> dict[str, Any]:
    """Where each role runs, for `--dry-run`."""
    r = cfg.ray
    each = lambda resources: ", ".join(f"{k}={v:g}" for k, v in resources.items())  # noqa: E731
    plan: dict[str, Any] = {
        "student": f"{r.num_workers} Ray Train worker(s) ({each(r.resources_per_worker)} each), DeepSpeed ZeRO-{cfg.train.zero_stage}",
    }
    if mode == "distill":
        plan["teacher"] = (f"{r.teacher_actors} teacher actor(s) ({each(r.teacher_resources)} each)" if r.teacher_actors
                           else "inside each Train worker")
        plan["critic"] = ("a DeepSpeed engine inside each Train worker" if r.critic_placement == "trainer" else
                          f"{r.critic_actors} critic actor(s) ({each(r.critic_resources)} each), one DeepSpeed "
                          f"ZeRO-{cfg.train.zero_stage} engine with its own process group")
    plan["data"] = cfg.data.output
    plan["checkpoints"] = run_dir(cfg, mode)
    plan["export"] = export_path(cfg, mode)
    return plan


# A dataset smaller than this on disk is read once into Ray's object store: each later epoch then costs
# milliseconds instead of seconds of re-reading (the toy world cycles through its 96 rows every 12 steps).
MATERIALIZE_BELOW_BYTES = 2 << 30


def training_dataset(output: str, columns: list[str]):
    """The run's Ray Dataset. A small one is read here, shard by shard, and handed to Ray as blocks whose
    metadata is computed here too: Ray Data (2.60) runs its Parquet footer readers, read tasks and even
    `from_arrow`'s metadata tasks at a whole CPU each, so when the teacher and critic actors leave less
    than one CPU free they wait forever, without a word (bench/parquet_read_starved.py). A large one
    streams through `read_parquet`: give such a cluster a free CPU per node beside its roles."""
    import fsspec
    import pyarrow.parquet as pq
    import ray.data

    shards = data.shard_paths(output)
    fs = fsspec.core.url_to_fs(output)[0]
    if sum(fs.size(path) for path in shards) >= MATERIALIZE_BELOW_BYTES:
        return ray.data.read_parquet(output, columns=columns)
    tables = []
    for path in shards:
        with fsspec.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return ray.data.from_blocks(tables)


def fit(
    cfg: Config, mode: Mode, teacher: RealScore | None = None, tracking_uri: str = "", mlflow_run_id: str = "", critic: Any = None
):
    """Run (or resume) ODE init or distillation on Ray Train; returns Ray Train's `Result`. `teacher` and
    `critic` are actor roles (`actors.roles.actor_roles`); None puts the role inside each Train worker."""
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.samples import fixed_samples

    cfg = with_absolute_paths(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the workers show a progress bar of steps
    info = data.read_info(cfg.data.output)
    columns = ["id", "prompt", "kind", "text_embedding", "latent"] + (["trajectory"] if mode == "ode_init" else [])
    spec = RunSpec(
        config=cfg.to_dict(), mode=mode, info=info, negative=data.read_negative_prompt(cfg.data.output),
        teacher=teacher, critic=critic, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id,
        samples=fixed_samples(cfg.data.output, cfg.tracking.sample_prompts)
        if tracking_uri and cfg.model.codec and cfg.tracking.sample_every > 0 else {},
    )
    r = cfg.ray
    storage_path, storage_filesystem = ray_storage(f"{storage_root(cfg).rstrip('/')}/{run_name(cfg)}")
    trainer = TorchTrainer(
        train_loop,
        # A reference, not the spec: Ray Train's controller unpickles train_loop_config, and the spec's
        # classes would make it import torch, diffusers and DeepSpeed (~4 s per run, on the head node).
        train_loop_config={"spec": ray.put(spec)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=dict(r.resources_per_worker)
        ),
        run_config=ray.train.RunConfig(
            name=mode, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        ),
        # The same order on every run, split the same way (no locality), so a resumed run sees the data
        # an uninterrupted one would.
        datasets={"train": training_dataset(cfg.data.output, columns)},
        dataset_config=ray.train.DataConfig(
            execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
    )
    try:
        return trainer.fit()
    except SystemExit as stop:  # Ray Train's own Ctrl-C handler aborts the run, then exits
        from pipeline.failures import Interrupted

        raise Interrupted(f"training stopped; rerun the same command to resume from {run_dir(cfg, mode)}") from stop


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def latest_checkpoint(cfg: Config, mode: Mode) -> str | None:
    """The run's newest checkpoint that Ray Train registered (every worker's part persisted), or None.
    A directory left half-written by a job that died is never registered, so never picked."""
    import fsspec

    from pipeline.storage import user_path

    fs, root = fsspec.core.url_to_fs(run_dir(cfg, mode))
    if not fs.exists(f"{root}/{RAY_SNAPSHOT}"):
        return None
    latest = json.loads(fs.cat(f"{root}/{RAY_SNAPSHOT}")).get("latest_checkpoint_result")
    return user_path(fs, f"{root}/{latest['checkpoint_dir_name']}") if latest else None


def export_path(cfg: Config, mode: Mode) -> str:
    return cfg.train.export_path or f"{run_dir(cfg, mode)}/export"


def export_latest(cfg: Config, mode: Mode, checkpoint: str | None = None) -> str:
    """Export the student of `checkpoint` (default: the run's latest) for generation; returns where."""
    import fsspec

    from pipeline.checkpoint import export_student
    from pipeline.storage import local_copy

    checkpoint = checkpoint or latest_checkpoint(cfg, mode)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir(cfg, mode)}: no complete checkpoint to export")
    fs, root = fsspec.core.url_to_fs(checkpoint)
    step = json.loads(fs.cat(f"{root}/{STATE_FILE}"))["step"]
    architecture = json.loads(fs.cat(f"{root}/{ARCHITECTURE_FILE}"))
    exported = EMA_FILE if fs.exists(f"{root}/{EMA_FILE}") else WEIGHTS_FILE
    with local_copy(f"{checkpoint.rstrip('/')}/{exported}") as weights:  # not the optimiser states
        export_student(weights, architecture, cfg, export_path(cfg, mode), source={"checkpoint": checkpoint, "step": step})
    return export_path(cfg, mode)


def launch(cfg: Config, mode: Mode, teacher: RealScore | None = None, critic: Any = None) -> dict[str, Any]:
    """The driver of a training job: MLflow run (resumed with the run), fit on Ray Train, export.
    Returns a summary: final metrics, checkpoint, export path, MLflow URI and run id."""
    from pipeline.tracking import MLflowTracker, NullTracker, tracking_uri

    directory = run_dir(cfg, mode)
    tracker: Any = NullTracker()
    uri = run_id = ""
    if cfg.tracking.tracking_uri != "none":
        tags = {"oneforce.mode": mode, "oneforce.config_hash": data.config_hash(cfg.to_dict()), **_git_tags()}
        tracker = MLflowTracker(cfg.tracking, directory, cfg.to_dict(), f"{mode}:{run_name(cfg)}", tags=tags,
                                uri=tracking_uri(cfg.tracking, directory))
        uri, run_id = tracker.uri, tracker.run_id
    try:
        result = fit(cfg, mode, teacher, uri, run_id, critic)
        exported = export_latest(cfg, mode, result.checkpoint.path if not is_url(directory) else None)
    except BaseException:
        tracker.close()
        raise
    tracker.close()
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path, "export": exported,
            "tracking_uri": uri, "mlflow_run_id": run_id}


def _git_tags() -> dict[str, str]:
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return {}
    return {"mlflow.source.git.commit": commit} if commit else {}


def preflight(cfg: Config, mode: Mode) -> None:
    """What can be checked on the driver before Ray and MLflow start: the dataset, and every weight
    path's layout and shapes."""
    info = data.read_info(cfg.data.output)  # names the directory when it is not a dataset
    if not data.shard_paths(cfg.data.output):
        raise FileNotFoundError(f"data.output={cfg.data.output}: no shards; run jobs/preprocess.py first")
    if mode == "ode_init" and not info.trajectory_timesteps:
        raise ValueError(f"data.output={cfg.data.output} holds no ODE trajectories: preprocess with data.trajectory_steps set")
    expected = (student_latent_channels(cfg, mode), cfg.model.num_latent_frames, cfg.model.latent_height, cfg.model.latent_width)
    if tuple(info.latent.shape) != expected:
        raise ValueError(
            f"data.output={cfg.data.output} holds latents of shape {list(info.latent.shape)}, the config asks for "
            f"{list(expected)} (model.num_latent_frames, model.latent_height, model.latent_width)"
        )
    check_weights(cfg, mode)
    if cfg.tracking.tracking_uri != "none":
        from pipeline.tracking import check_reachable, tracking_uri

        check_reachable(tracking_uri(cfg.tracking, run_dir(cfg, mode)))


def weight_paths(mode: Mode) -> list[str]:
    """The model paths a training job loads (ODE init builds no critic)."""
    return ["teacher_path", "student_init_path" if mode == "ode_init" else "student_path",
            *(["critic_path"] if mode == "distill" else []), "text_encoder_path", "codec"]


def check_weights(cfg: Config, mode: Mode) -> None:
    """Every weight path of the job: layout and shapes from headers and listings (local or s3); an
    empty student or critic path: the teacher fits its architecture. Also `--dry-run`'s check."""
    from pipeline.models.loading import check_model_paths

    check_model_paths(cfg.model, weight_paths(mode))


def student_latent_channels(cfg: Config, mode: Mode) -> int:
    from pipeline.models.loading import student_architecture

    return int(student_architecture(cfg.model, for_ode_init=mode == "ode_init")["in_channels"])


def summary_text(summary: dict[str, Any]) -> str:
    metrics = {k: round(v, 4) for k, v in summary["metrics"].items() if isinstance(v, float)}
    lines = [
        f"finished at step {summary['metrics'].get('step')}: {json.dumps(metrics)}",
        f"checkpoint: {summary['checkpoint']}",
        f"export:     {summary['export']}   (python jobs/generate.py --checkpoint {summary['export']} --prompts FILE --out DIR)",
    ]
    if summary["tracking_uri"]:
        lines.append(f"MLflow run {summary['mlflow_run_id']}: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return "\n".join(lines)
