"""What a user meets when something goes wrong (issue 15): errors raised inside Ray workers come back as
the user's own one-line error with a log of the traceback; failed and interrupted runs say so in
MLflow's store; a failed preprocess does not block its rerun; s3:// failures name the URL and cause."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from jobs import preprocess
from pipeline import failures
from pipeline.storage import StorageError, check_exists, check_writable
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.wan_weights import WAN_CONFIGS
from tests.test_preprocess import _config

REPO = Path(__file__).resolve().parents[1]
TINY_PREPROCESS = [
    "model.teacher_arch=tiny", "model.num_latent_frames=3", "model.latent_height=4", "model.latent_width=4",
    "method.shift=3.0", "method.gradient_num_blocks=3", "method.negative_prompt=blurry", "data.teacher_steps=3",
    "data.trajectory_steps=[1000, 500]", "ray.encoder_resources={CPU: 0.5}", "ray.teacher_resources={CPU: 0.5}",
]


def run_job(script: str, args: list[str], logs: Path, timeout: float = 300, **env_changes: str) -> subprocess.CompletedProcess:
    """`python jobs/<script> ARGS` as a user runs it, its failure logs kept under `logs`."""
    env = {**os.environ, "ONEFORCE_LOG_DIR": str(logs), "PYTHONUNBUFFERED": "1", **env_changes}
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


# ---------------------------------------------------------------------------------------------------
# s3:// failures: one line naming the URL and the cause, within seconds
# ---------------------------------------------------------------------------------------------------


def _moto(port: int, **env: str) -> subprocess.Popen:
    """A moto S3 server of this test's own (the session's one stays up for the other tests)."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    deadline = time.time() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)


def _point_s3_at(monkeypatch, endpoint: str) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # cached clients keep the endpoint they were made with
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)


@pytest.fixture
def fresh_s3(s3_server, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_missing_bucket_wrong_keys_and_no_credentials_are_named(fresh_s3, tmp_path):
    with pytest.raises(StorageError, match=r"^data.prompts=s3://no-such-bucket/p.txt: bucket missing$"):
        check_exists("s3://no-such-bucket/p.txt", "data.prompts")
    with pytest.raises(StorageError, match=r"^data.output=s3://no-such-bucket/out: bucket missing$"):
        check_writable("s3://no-such-bucket/out", "data.output")

    port = _free_port()
    strict = _moto(port, INITIAL_NO_AUTH_ACTION_COUNT="0")  # moto checks the keys only when asked to
    try:
        _point_s3_at(fresh_s3, f"http://127.0.0.1:{port}")
        with pytest.raises(StorageError, match=r"^data.output=s3://oneforce-test/out: access denied \(InvalidAccessKeyId"):
            check_writable("s3://oneforce-test/out", "data.output")
    finally:
        strict.terminate()
        strict.wait(timeout=10)

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        fresh_s3.delenv(key)
    fresh_s3.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    fresh_s3.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    fresh_s3.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _point_s3_at(fresh_s3, os.environ["AWS_ENDPOINT_URL"])
    with pytest.raises(StorageError, match=r"^--prompts=s3://oneforce-test/p.txt: no credentials"):
        check_exists("s3://oneforce-test/p.txt", "--prompts")


def test_a_stopped_s3_server_is_one_line_within_seconds(fresh_s3, tmp_path):
    port = _free_port()
    _moto(port).terminate()  # started and stopped: nothing listens there any more
    endpoint = f"http://127.0.0.1:{port}"
    _point_s3_at(fresh_s3, endpoint)
    start = time.time()
    with pytest.raises(StorageError, match=f"^data.output=s3://oneforce-test/out: endpoint unreachable \\({endpoint}"):
        check_writable("s3://oneforce-test/out", "data.output")
    assert time.time() - start < 10

    # The same through a job, before Ray or MLflow start.
    (tmp_path / "ckpt").mkdir()
    start = time.time()
    result = run_job("generate.py", ["--checkpoint", str(tmp_path / "ckpt"), "--prompts", "s3://oneforce-test/p.txt", "--out", str(tmp_path / "out"),
                                     "tracking.tracking_uri=none"], tmp_path / "logs", timeout=120, AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
    assert result.returncode == 2 and error_line(result).startswith(f"error: --prompts=s3://oneforce-test/p.txt: endpoint unreachable ({endpoint}")
    assert time.time() - start < 60  # Python, torch and Ray imports included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
