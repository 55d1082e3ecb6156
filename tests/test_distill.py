"""Distillation and ODE init on Ray Train + DeepSpeed against the plain single-process loop."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import data, distill, distributed, trainer
from pipeline.config import Config, load_config

COMPARED = ("critic_loss", "critic_flow", "gan_d", "dmd", "gan_g", "ode_loss")
FRAMES, TRAJECTORY = 3, (1000.0, 750.0, 500.0, 250.0)


def write_tiny_dataset(out: str, rows: int = 4, seed: int = 0) -> None:
    """A dataset in the preprocessed layout for the `tiny` architecture (random tensors: the loop's
    mechanics, not its quality, are under test here)."""
    g = torch.Generator().manual_seed(seed)
    info = data.DatasetInfo(
        config_hash="tiny", teacher_id="random:tiny:0", text_embedding=data.TensorSpec((5, 32), "float32"),
        latent=data.TensorSpec((4, FRAMES, 8, 8), "float32"), trajectory_timesteps=TRAJECTORY, negative_prompt="",
    )
    data.write_info(out, info)
    data.write_negative_prompt(out, "", torch.randn(5, 32, generator=g) * 0.1)
    ids = [f"{i:016x}" for i in range(rows)]
    data.write_shard(out, info, {
        "id": ids, "prompt": [f"prompt {i}" for i in range(rows)], "seed": list(range(rows)), "kind": ["teacher"] * rows,
        "text_embedding": torch.randn(rows, 5, 32, generator=g), "latent": torch.randn(rows, 4, FRAMES, 8, 8, generator=g),
        "trajectory": torch.randn(rows, len(TRAJECTORY), 4, FRAMES, 8, 8, generator=g),
    })


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny_data"))
    write_tiny_dataset(out)
    return out


def tiny_config(dataset: str, storage: str, name: str, *overrides: str) -> Config:
    return load_config(None, [
        f"name={name}", f"data.output={dataset}", f"train.storage_path={storage}", "tracking.tracking_uri=none",
        f"model.num_latent_frames={FRAMES}", "model.latent_height=8", "model.latent_width=8",
        "method.gradient_num_blocks=2", "method.gen_every=2", "method.shift=3.0", "method.real_guidance=2.0",
        "method.discriminator.feature_layers=[0, 1]", "method.r1_weight=1.0", "method.r2_weight=0.001",
        "train.lr=1e-3", "train.critic_lr=1e-3", "train.ema_start_step=2", "train.steps=5", "train.checkpoint_every=5",
        "ray.resources_per_worker={CPU: 0.5}", "ray.teacher_actors=0", *overrides,
    ])


def plain_run(cfg: Config, batches: list[dict]) -> tuple[list[dict[str, float]], distill.StepContext]:
    """The reference: the same steps in this process, fed `batches` in order."""
    ctx = distill.plain_context(cfg, data.read_negative_prompt(cfg.data.output))
    return distill.plain_distill(ctx, iter(batches), range(len(batches))), ctx


def plain_history(cfg: Config, batches: list[dict]) -> list[dict[str, float]]:
    return plain_run(cfg, batches)[0]


def rows_by_id(dataset: str) -> dict[str, dict]:
    rows = data.read_dataset(dataset)
    return {row_id: i for i, row_id in enumerate(rows["id"])}, rows


def batches_read(history: list[dict], dataset: str) -> list[dict]:
    """The rows each step's workers read, rank by rank, as one batch per step."""
    index, rows = rows_by_id(dataset)
    batches = []
    for entry in history:
        take = [index[i] for ids in entry["ids"] for i in ids]
        batches.append({k: (v[take] if isinstance(v, torch.Tensor) else [v[i] for i in take]) for k, v in rows.items() if v is not None})
    return batches


def history_of(result) -> list[dict]:
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / trainer.STATE_FILE).read_text())["history"]


def assert_same_losses(distributed: list[dict], reference: list[dict], keys=COMPARED, rel=1e-4) -> None:
    assert len(distributed) == len(reference)
    for step, (got, want) in enumerate(zip(distributed, reference)):
        shared = [k for k in keys if k in want]
        assert shared and all(k in got for k in shared), (step, sorted(got), sorted(want))
        for key in shared:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-7), (step, key, got[key], want[key])


def worst_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest, over tensors, of |got - want| / |want| (Frobenius norms, one tensor at a time)."""
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)) for k in want)


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 with two workers: tests/test_critic_actors.py
def test_two_workers_and_a_teacher_actor_equal_plain_loop_on_the_rows_they_read(ray_local, tiny_data, tmp_path, stage):
    """The critic in the Train workers, the teacher on its own actor; the critic on actors and the
    fault cases are in tests/test_critic_actors.py."""
    from actors.teacher import TeacherPool

    cfg = tiny_config(tiny_data, str(tmp_path), f"two-z{stage}", "ray.num_workers=2", f"train.zero_stage={stage}",
                      "ray.teacher_actors=1", "ray.teacher_resources={CPU: 0.5}")
    pool = TeacherPool.start(cfg, data.read_negative_prompt(tiny_data))
    try:
        result = trainer.fit(cfg, "distill", pool)
    finally:
        pool.shutdown()
    history = history_of(result)
    assert [h["step"] for h in history] == list(range(5)) and all(len(h["ids"]) == 2 for h in history)
    assert sum("dmd" in h for h in history) == 3  # steps 0, 2, 4 update the generator first
    assert len({i for h in history[:2] for ids in h["ids"] for i in ids}) == 4  # the two ranks read different rows
    reference, ctx = plain_run(cfg, batches_read(history, cfg.data.output))
    assert_same_losses(history, reference)
    with result.checkpoint.as_directory() as directory:  # the fp32 EMA, gathered from the partitions under ZeRO-3
        ema = load_file(f"{directory}/{trainer.EMA_FILE}")
        assert not os.path.exists(f"{directory}/{trainer.WEIGHTS_FILE}")  # the EMA is written once
    exported = load_file(f"{trainer.export_latest(cfg, 'distill', result.checkpoint.path)}/transformer/diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)  # an export holds the EMA
    plain_ema = ctx.ema.full_state(ctx.student)
    assert ema.keys() == plain_ema.keys() and all(v.dtype == torch.float32 for v in ema.values())
    # Each tensor against its own scale: a different reduction order under ZeRO-3 moves single elements
    # near zero by ~2e-5 of the tensor's largest value (norm ratio ~1e-6); an EMA from the wrong step
    # or of the wrong weights is off by 6e-3 or more.
    assert worst_relative_error(ema, plain_ema) < 1e-4
    _, one_step_short = plain_run(cfg, batches_read(history, cfg.data.output)[:4])
    assert worst_relative_error(one_step_short.ema.full_state(one_step_short.student), plain_ema) > 1e-3
    assert worst_relative_error(ctx.student.full_state(), plain_ema) > 1e-3


class NaNAtStep:
    """A real score that is not finite at one call: the generator update of that step must be skipped."""

    def __init__(self, inner: distill.RealScore, bad_call: int) -> None:
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def real_x0(self, x_t, t, text):
        value = self.inner.real_x0(x_t, t, text).result()
        self.calls += 1
        return distill.Ready(value * float("nan") if self.calls - 1 == self.bad_call else value)


def test_non_finite_generator_loss_skips_the_update_and_leaves_weights(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, str(tmp_path), "nan")
    ctx = distill.plain_context(cfg, data.read_negative_prompt(tiny_data))
    ctx.teacher = NaNAtStep(ctx.teacher, bad_call=1)
    student, student_opt = ctx.student.module, ctx.student
    rows = data.read_dataset(tiny_data)
    batches = distill.epoch_batches(rows, 2)
    history = distill.plain_distill(ctx, batches, range(2))  # step 0 updates the generator normally
    before = {k: v.clone() for k, v in student.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in student_opt.optimizer.state.items()}
    metrics = distill.distill_step(ctx, distill.rows_to_batch(next(batches), [4, 5]), 2)  # the NaN call
    assert history[0]["generator_skipped"] == 0.0 and metrics["generator_skipped"] == 1.0
    assert not math.isfinite(metrics["dmd_normaliser"])
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(moments[id(p)], s["exp_avg"]) for p, s in student_opt.optimizer.state.items())
    assert metrics["critic_skipped"] == 0.0  # the critic's own losses were finite: it still steps


def _all_finite_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        finite = torch.tensor(1.0)
        decisions = [distributed.all_finite(finite), distributed.all_finite(finite if rank == 0 else finite * float("inf"))]
        Path(out, f"rank{rank}.json").write_text(json.dumps(decisions))
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Two real gloo ranks. Started with spawn and reporting through files: a fork of this process
    (multiprocessing's Manager) would inherit the Ray driver's threads and break its later calls."""
    import torch.multiprocessing as mp

    from tests.browser import free_port

    mp.spawn(_all_finite_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[True, False], [True, False]]


def test_ema_is_fp32_and_starts_from_the_weights_at_ema_start_step(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, str(tmp_path), "ema", "train.ema_start_step=1", "method.gen_every=1", "train.ema_decay=0.9")
    batches = list(itertools.islice(distill.epoch_batches(data.read_dataset(tiny_data), 2), 3))
    _, ctx = plain_run(cfg, batches[:1])
    assert ctx.ema is None  # step 0 < ema_start_step
    weights = []
    for step in (1, 2):
        distill.distill_step(ctx, distill.rows_to_batch(batches[step], [2 * step, 2 * step + 1]), step)
        weights.append({k: v.detach().clone() for k, v in ctx.student.module.state_dict().items()})
    for name, value in ctx.ema.full_state(ctx.student).items():
        assert value.dtype == torch.float32
        assert torch.allclose(value, 0.9 * weights[0][name] + 0.1 * weights[1][name], atol=1e-7)


def test_relative_paths_reach_workers_and_actors_absolute(tmp_path, monkeypatch):
    """Train workers and critic actors run in other directories: the run directory they write
    checkpoints into must not depend on their working directory."""
    monkeypatch.chdir(tmp_path)
    cfg = trainer.with_absolute_paths(load_config(None, ["train.storage_path=runs", "data.output=data", "train.export_path=out",
                                                         "model.teacher_path=s3://bucket/teacher"]))
    monkeypatch.chdir("/")
    assert trainer.run_dir(cfg, "distill") == str(tmp_path / "runs" / "default" / "distill")
    assert (cfg.data.output, cfg.train.export_path) == (str(tmp_path / "data"), str(tmp_path / "out"))
    assert cfg.model.teacher_path == "s3://bucket/teacher"
