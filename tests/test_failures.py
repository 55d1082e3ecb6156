"""What a user meets when something goes wrong (issue 15): errors raised inside Ray workers come back as
the user's own one-line error with a log of the traceback; failed and interrupted runs say so in
MLflow's store; a failed preprocess does not block its rerun; s3:// failures name the URL and cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from jobs import preprocess
from pipeline import failures
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.wan_weights import WAN_CONFIGS
from tests.test_preprocess import _config

REPO = Path(__file__).resolve().parents[1]
TINY_PREPROCESS = [
    "model.teacher_arch=tiny", "model.num_latent_frames=3", "model.latent_height=4", "model.latent_width=4",
    "method.shift=3.0", "method.gradient_num_blocks=3", "method.negative_prompt=blurry", "data.teacher_steps=3",
    "data.trajectory_steps=[1000, 500]", "ray.encoder_resources={CPU: 0.5}", "ray.teacher_resources={CPU: 0.5}",
]


def run_job(script: str, args: list[str], logs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python jobs/<script> ARGS` as a user runs it, its failure logs kept under `logs`."""
    env = {**os.environ, "ONEFORCE_LOG_DIR": str(logs), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def run_statuses(uri: str) -> list[str]:
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("oneforce")
    return [run.info.status for run in client.search_runs([experiment.experiment_id])]


def wrong_shape_teacher(path: Path) -> Path:
    """A diffusers folder whose config.json asks for a wider FFN than its tensors hold."""
    torch.manual_seed(0)
    CausalWanModel(**WAN_CONFIGS["tiny"]).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["ffn_dim"] *= 2
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------------------
# Errors inside Ray: a task, an actor's constructor, a Ray Data stage, a Ray Train worker group
# ---------------------------------------------------------------------------------------------------


@ray.remote
def _missing_file() -> None:
    raise FileNotFoundError("model.teacher_path=/nope: no such file or directory")


class _BrokenStage:
    def __init__(self) -> None:
        raise ValueError("model.codec=/broken: not a VAE folder")

    def __call__(self, batch: dict) -> dict:
        return batch


def _bad_batch(batch: dict) -> dict:
    raise KeyError("prompt")


def test_errors_raised_in_ray_come_back_as_the_users_own(ray_local):
    with pytest.raises(Exception) as task:
        ray.get(_missing_file.remote())
    assert failures.cause(task.value) == failures.Cause("FileNotFoundError", "model.teacher_path=/nope: no such file or directory", True)

    data = ray.data.range(4)
    with pytest.raises(Exception) as actor:  # ActorDiedError: Ray keeps the constructor's error as text only
        data.map_batches(_BrokenStage, compute=ray.data.ActorPoolStrategy(size=1), batch_size=2).take_all()
    assert failures.cause(actor.value) == failures.Cause("ValueError", "model.codec=/broken: not a VAE folder", True)

    with pytest.raises(Exception) as udf:  # RayTaskError(UserCodeException): the KeyError is in its text
        data.map_batches(_bad_batch, batch_size=2).take_all()
    found = failures.cause(udf.value)
    assert found.type_name == "KeyError" and found.line() == "'prompt'" and found.bad_input


def test_ray_train_worker_failures_unwrap_to_the_lowest_rank():
    from ray.train import WorkerGroupError

    err = WorkerGroupError("2 workers failed", {1: RuntimeError("rank 1"), 0: ValueError("train.lr must be > 0")})
    assert failures.cause(err).line() == "train.lr must be > 0"
    assert failures.cause(RuntimeError("boom")) == failures.Cause("RuntimeError", "boom", False)


def test_a_teacher_that_fails_to_load_in_its_actor_is_one_line_exit_2_failed_in_mlflow_and_the_fixed_rerun_runs(
    ray_local, ray_cluster, tmp_path
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left, fast\na blue circle moving up, slow\n")
    teacher, out, uri = wrong_shape_teacher(tmp_path / "teacher"), tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    result = run_job("preprocess.py", [
        *TINY_PREPROCESS, f"model.teacher_path={teacher}", f"data.prompts={prompts}", f"data.output={out}",
        f"tracking.tracking_uri={uri}", f"ray.address={ray_cluster[0]}",
    ], tmp_path / "logs")
    line = error_line(result)
    assert result.returncode == 2, result.stderr[-3000:]
    assert line.startswith(f"error: model.teacher_path={teacher}: ") and "expected shape" in line, line
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs" and "Traceback (most recent call last)" in log.read_text()
    assert run_statuses(uri) == ["FAILED"]

    # The failed run wrote the dataset's description before the teacher loaded; fixing the setting and
    # rerunning into the same output works, as no row was written.
    plan, written = preprocess.run(_config(str(prompts), str(out)))
    assert written == 2
    # Once rows exist, another config is refused, with the command that starts over.
    with pytest.raises(ValueError, match=f"holds 1 shards .* start over with `rm -r {out}`"):
        preprocess.run(_config(str(prompts), str(out), **{"data.teacher_steps": 4}))


def test_driver_side_checks_fail_before_ray_starts(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left, fast\n")
    result = run_job("preprocess.py", [
        *TINY_PREPROCESS, f"model.teacher_path={tmp_path}/nope", f"data.prompts={prompts}", f"data.output={tmp_path}/out",
        "tracking.tracking_uri=none", "ray.address=127.0.0.1:1",  # no Ray there: the check must come first
    ], tmp_path / "logs")
    assert result.returncode == 2 and error_line(result).startswith(f"error: model.teacher_path={tmp_path}/nope: no such file")


def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  teacher_arch: tiny\n   bad: [1\n")
    result = run_job("preprocess.py", ["--config", str(config)], tmp_path / "logs")
    assert result.returncode == 2 and result.stderr.strip() == f"error: {config}:3:7: mapping values are not allowed here (not valid YAML)"
