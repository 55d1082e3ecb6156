"""What a user meets when something goes wrong (issue 15): errors raised inside Ray workers come back as
the user's own one-line error with a log of the traceback; failed and interrupted runs say so in
MLflow's store; a failed preprocess does not block its rerun; s3:// failures name the URL and cause."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from safetensors.torch import save_file

from jobs import generate, preprocess
from jobs.cli import parse
from pipeline import failures
from pipeline.config import ModelConfig
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.loading import check_weights
from pipeline.models.wan_weights import WAN_CONFIGS
from pipeline.storage import StorageError, check_exists, check_writable
from tests.browser import free_port
from tests.conftest import start_moto
from tests.test_preprocess import _config
from tests.wan_releases import diffusers_dit_to_original

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


def cut_short_teacher(path: Path) -> Path:
    """A diffusers folder whose weights file was cut short (an interrupted copy): config.json and the
    safetensors header are intact, so only loading the tensors, in the teacher's Ray actor, finds it."""
    torch.manual_seed(0)
    CausalWanModel(**WAN_CONFIGS["tiny"]).save_pretrained(path)
    weights = path / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return path


# Ray's and MLflow's own log records (timestamped INFO/WARNING lines, Ray Data's progress on a
# non-terminal) and the job's progress bar: what a successful run prints too.
_RAY_RECORD = re.compile(r"^\[?\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d|^preprocess: ")


# ---------------------------------------------------------------------------------------------------
# Errors inside Ray: a task, an actor's constructor, a Ray Data stage, a Ray Train worker group
# ---------------------------------------------------------------------------------------------------


def test_errors_raised_in_ray_come_back_as_the_users_own(ray_local):
    # Defined here, not at module level: Ray pickles a module-level function by reference, so each
    # worker would import this test module, torch and the models with it (~10 s of CPU per worker).
    @ray.remote
    def missing_file() -> None:
        raise FileNotFoundError("model.teacher_path=/nope: no such file or directory")

    class BrokenStage:
        def __init__(self) -> None:
            raise ValueError("model.codec=/broken: not a VAE folder")

        def __call__(self, batch: dict) -> dict:
            return batch

    def bad_batch(batch: dict) -> dict:
        raise KeyError("prompt")

    with pytest.raises(Exception) as task:
        ray.get(missing_file.remote())
    assert failures.cause(task.value) == failures.Cause("FileNotFoundError", "model.teacher_path=/nope: no such file or directory", True)

    data = ray.data.range(4)
    with pytest.raises(Exception) as actor:  # ActorDiedError: Ray keeps the constructor's error as text only
        data.map_batches(BrokenStage, compute=ray.data.ActorPoolStrategy(size=1), batch_size=2).take_all()
    assert failures.cause(actor.value) == failures.Cause("ValueError", "model.codec=/broken: not a VAE folder", True)

    with pytest.raises(Exception) as udf:  # RayTaskError(UserCodeException): the KeyError is in its text
        data.map_batches(bad_batch, batch_size=2).take_all()
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
    teacher, out, uri = cut_short_teacher(tmp_path / "teacher"), tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    result = run_job("preprocess.py", [
        *TINY_PREPROCESS, f"model.teacher_path={teacher}", f"data.prompts={prompts}", f"data.output={out}",
        f"tracking.tracking_uri={uri}", f"ray.address={ray_cluster[0]}",
    ], tmp_path / "logs")
    line = error_line(result)
    assert result.returncode == 2, result.stderr[-3000:]
    assert line.startswith(f"error: model.teacher_path={teacher}: Unable to load weights from checkpoint file"), line
    # Nothing of the actor's traceback (Ray forwards the worker's stderr and the raylet's retry report)
    # nor Ray Data's "Full stack trace" above the line: besides Ray's usual records, it is all there is.
    assert [x for x in result.stderr.splitlines() if x.strip() and not _RAY_RECORD.match(x)] == [line], result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr and 'File "' not in result.stdout + result.stderr
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    text = log.read_text()
    assert log.parent == tmp_path / "logs" and text.startswith("jobs/preprocess.py ")
    # The full story is in the log: the worker's own traceback down to safetensors, and the driver's.
    assert text.count("Traceback (most recent call last)") >= 2 and 'actors/teacher.py", line' in text
    assert "SafetensorError" in text and "ActorDiedError" in text
    assert run_statuses(uri) == ["FAILED"]

    # The failed run wrote the dataset's description before the teacher loaded; fixing the setting and
    # rerunning into the same output works, as no row was written.
    plan, written = preprocess.run(_config(str(prompts), str(out)))
    assert written == 2
    # Once rows exist, another config is refused, with the command that starts over.
    with pytest.raises(ValueError, match=f"holds 1 shards .* start over with `rm -r {out}`"):
        preprocess.run(_config(str(prompts), str(out), **{"data.teacher_steps": 4}))


def test_worker_tracebacks_go_to_the_log_while_progress_bars_still_print(tmp_path, monkeypatch):
    """What the driver does with the lines Ray forwards (a Train worker's bar and its traceback, split
    across batches; a raylet retry report holding a whole traceback in one line)."""
    monkeypatch.setattr(failures, "_log_path", tmp_path / "distill.log")
    printed = []
    route = failures.WorkerTracebacks(lambda data, file, *rest: printed.append(data["lines"]))
    worker = {"pid": 7, "ip": "10.0.0.2", "is_err": True, "actor_name": "RayTrainWorker"}
    route({**worker, "lines": ["toy:  10%|#         | 3/30", "Traceback (most recent call last):",
                               '  File "pipeline/trainer.py", line 9, in loop', "    step()",
                               "ValueError: model.critic_path=/x: bad"]}, sys.stderr)
    route({**worker, "lines": ["", "The above exception was the direct cause of the following exception:", "",
                               "\x1b[36mray::RayTrainWorker.run()\x1b[39m (pid=7, ip=10.0.0.2)", '  File "x.py", line 1, in f',
                               "RuntimeError: boom", "toy:  20%|##        | 6/30"]}, sys.stderr)
    route({"pid": "raylet", "is_err": False, "lines": ["Task f failed. Error: Traceback (most recent call last):\n  File ..."]}, sys.stdout)
    # The GCS's records reach every driver of the cluster, about any job's actors; a worker's C++ record.
    route({"pid": "gcs_server", "is_err": True, "lines": [
        "[2026-01-01 10:00:00,000 W 5 6] gcs_actor_scheduler.cc:42: Failed to kill actor 01ab, status: NotFound"]}, sys.stderr)
    route({**worker, "lines": ["[2026-01-01 10:00:00,001 E 7 8] core_worker.cc:9: lost the GCS", "toy:  30%|###       | 9/30"]}, sys.stderr)
    route({"pid": 9, "ip": "10.0.0.1", "is_err": True, "actor_name": "TrainController", "lines": [
        "2026-01-01 10:00:00,000\tERROR controller.py:120 -- Training failed.", "Traceback (most recent call last):",
        '  File "x.py", line 1, in f', "ray.train.WorkerGroupError: 1 worker failed", "2026-01-01 10:00:01,000\tINFO x.py:1 -- done"]}, sys.stderr)
    route({"pid": 10, "ip": "10.0.0.1", "is_err": True, "actor_name": "SplitCoordinator", "lines": [
        "Execution plan of Dataset train_0: InputDataBuffer[Input] -> OutputSplitter[split(1, equal=True)]"]}, sys.stderr)
    assert printed == [["toy:  10%|#         | 3/30"], ["toy:  20%|##        | 6/30"], ["toy:  30%|###       | 9/30"]]
    text = (tmp_path / "distill.log").read_text()
    assert "Failed to kill actor 01ab" in text and "core_worker.cc:9: lost the GCS" in text
    assert "ValueError: model.critic_path=/x: bad" in text and "RuntimeError: boom" in text and "Task f failed" in text
    assert "Training failed." in text and "WorkerGroupError" in text and "INFO x.py:1 -- done" in text
    assert "Execution plan of Dataset train_0" in text  # Ray Train's controller and Ray Data's coordinator
    assert "[RayTrainWorker pid=7 ip=10.0.0.2]" in text


def test_a_closed_progress_bar_state_reaches_rays_bar_manager_once(tmp_path, monkeypatch):
    """A Train worker's lines arrive twice (its .out and .err): the second "closed" state of a bar would
    make Ray's driver draw it again, for good. States of open bars and other bars still pass."""
    import json

    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    monkeypatch.setattr(failures, "_log_path", tmp_path / "distill.log")
    assert failures._TQDM_MAGIC == RAY_TQDM_MAGIC
    printed = []
    route = failures.WorkerTracebacks(lambda data, file, *rest: printed.extend(data["lines"]))

    def state(uuid: str, x: int, closed: bool) -> str:
        return json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "x": x, "uuid": uuid, "closed": closed, "pid": 7})

    for stream in ("out", "err"):
        route({"pid": 7, "is_err": stream == "err", "lines": [state("a", 4, False), state("a", 8, True), state("b", 1, False)]}, sys.stderr)
    assert printed == [state("a", 4, False), state("a", 8, True), state("b", 1, False), state("b", 1, False)]


def test_a_broken_teacher_folder_fails_before_ray_starts(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left, fast\n")
    teacher = wrong_shape_teacher(tmp_path / "teacher")
    result = run_job("preprocess.py", [
        *TINY_PREPROCESS, f"model.teacher_path={teacher}", f"data.prompts={prompts}", f"data.output={tmp_path}/out",
        "tracking.tracking_uri=none", "ray.address=127.0.0.1:1",  # no Ray there: the check must come first
    ], tmp_path / "logs")
    assert result.returncode == 2 and error_line(result).startswith(
        f"error: model.teacher_path={teacher}: config.json does not match the weights beside it: 6 tensors of another "
        "shape (e.g. blocks.0.ffn.net.0.proj.bias: [64] in the weights, [128] expected)"
    ), result.stderr[-3000:]


def test_weights_that_do_not_fit_their_arch_are_named_on_the_driver_with_the_arch_to_set(tmp_path):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in CausalWanModel(**WAN_CONFIGS["tiny"]).state_dict().items()}
    student, critic = tmp_path / "student.safetensors", tmp_path / "critic.pt"
    save_file(state, student)
    # a Self-Forcing-style checkpoint: original Wan keys, wrapped and prefixed
    torch.save({"generator_ema": {f"model.{k}": v for k, v in diffusers_dit_to_original(state).items()}}, critic)
    cfg = ModelConfig(student_path=str(student), student_arch="toy", critic_path=str(critic), critic_arch="toy-debug")
    with pytest.raises(ValueError, match=(
        rf"^model.student_path={student}: the weights are not a 'toy' \(model.student_arch\): 69 tensors of another "
        r"shape \(e.g. blocks.0.attn1.norm_k.weight: \[24\] in the weights, \[192\] expected\), 54 missing \(e.g. "
        r"blocks.2.scale_shift_table\); set model.student_arch=tiny$"
    )):
        check_weights(cfg, "student_path")
    with pytest.raises(ValueError, match=rf"^model.critic_path={critic}: the weights are not a 'toy-debug' .*; set model.critic_arch=tiny$"):
        check_weights(cfg, "critic_path")
    check_weights(dataclasses.replace(cfg, student_arch="tiny"), "student_path")
    check_weights(dataclasses.replace(cfg, critic_arch="tiny"), "critic_path")
    with pytest.raises(FileNotFoundError, match=f"^model.student_init_path={tmp_path}/nope: no such file or directory$"):
        check_weights(ModelConfig(student_init_path=f"{tmp_path}/nope"), "student_init_path")
    # No path: the role starts from the teacher, which must then be of the role's architecture.
    with pytest.raises(ValueError, match=r"^model.critic_path is empty, so the critic starts from the teacher's weights, but the teacher is not a 'toy'"):
        check_weights(ModelConfig(critic_arch="toy"), "critic_path")

    # The jobs' driver checks run it.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left, fast\n")
    with pytest.raises(ValueError, match=rf"^model.teacher_path={student}: the weights are not a 'toy' \(model.teacher_arch\)"):
        preprocess.preflight(_config(str(prompts), str(tmp_path / "out"), **{"model.teacher_path": str(student), "model.teacher_arch": "toy"}))
    with pytest.raises(ValueError, match=rf"^--checkpoint={student}: the weights are not a 'toy' \(model.student_arch\).*; set model.student_arch=tiny$"):
        generate.preflight(str(student), str(prompts), str(tmp_path / "videos"), "toy")


def test_a_failed_or_interrupted_pretrain_ends_its_mlflow_run_failed_or_killed(tmp_path, monkeypatch):
    from jobs import pretrain_teacher
    from tests.test_pretrain import SMALL

    real = pretrain_teacher.flow_matching_loss
    for error, status in ((RuntimeError("CUDA out of memory"), "FAILED"), (failures.Interrupted("SIGTERM; stopped", signal.SIGTERM), "KILLED")):
        steps = []

        def loss_then_fail(*args, error=error, steps=steps, **kwargs):  # the third step fails
            steps.append(1)
            if len(steps) == 3:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(pretrain_teacher, "flow_matching_loss", loss_then_fail)
        uri = f"sqlite:///{tmp_path}/{status}.db"
        cfg, args = parse("test", ["--config", "configs/toy_teacher.yaml", f"pretrain.output={tmp_path / status}", "pretrain.steps=10",
                                   *SMALL, f"tracking.tracking_uri={uri}"], extra=pretrain_teacher.extra_args)
        with pytest.raises(type(error)):
            pretrain_teacher.main(cfg, args)
        assert run_statuses(uri) == [status]


def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  teacher_arch: tiny\n   bad: [1\n")
    result = run_job("preprocess.py", ["--config", str(config)], tmp_path / "logs")
    assert result.returncode == 2 and result.stderr.strip() == f"error: {config}:3:7: mapping values are not allowed here (not valid YAML)"


# ---------------------------------------------------------------------------------------------------
# s3:// failures: one line naming the URL and the cause, within seconds
# ---------------------------------------------------------------------------------------------------


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

    port = free_port()
    strict = start_moto(port, INITIAL_NO_AUTH_ACTION_COUNT="0")  # a server of its own: moto checks the keys only when asked to
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
    port = free_port()
    start_moto(port).terminate()  # started and stopped: nothing listens there any more
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


def test_exit_code_2_is_bad_input_not_an_interrupt():
    """SIGINT's number is also the bad-input exit code: only SIGTERM's SystemExit (how `ray.init`'s
    handler stops a job) counts as a signal."""
    import signal

    from pipeline.failures import interrupt_signal, run_status

    assert interrupt_signal(SystemExit(2)) is None and run_status(SystemExit(2)) == "FAILED"
    assert interrupt_signal(SystemExit(signal.SIGTERM)) == signal.SIGTERM and run_status(SystemExit(signal.SIGTERM)) == "KILLED"
    assert interrupt_signal(KeyboardInterrupt()) == signal.SIGINT


def test_rays_info_and_error_records_go_to_the_log_and_verbose_prints_them(tmp_path, monkeypatch):
    """On the driver's console handlers: Ray's info ("Connecting to existing Ray cluster") and error
    records go to the job's log, warnings print; --verbose (ONEFORCE_VERBOSE) leaves Ray's output alone."""
    import logging

    monkeypatch.setattr(failures, "_log_path", tmp_path / "job.log")
    keep = failures.RayRecordsToLog()
    record = lambda level, text: logging.LogRecord("ray", level, "worker.py", 1, text, None, None)  # noqa: E731
    assert not keep.filter(record(logging.INFO, "Connecting to existing Ray cluster at address: 127.0.0.1"))
    assert not keep.filter(record(logging.ERROR, "actors died during initialization"))
    assert keep.filter(record(logging.WARNING, "the object store is full"))
    text = (tmp_path / "job.log").read_text()
    assert "Connecting to existing Ray cluster" in text and "actors died" in text and "object store" not in text

    from ray._private import worker as ray_worker

    def printer(data, print_file, *args, **kwargs):
        pass

    handler = logging.StreamHandler()
    logging.getLogger("ray.oneforce_probe").addHandler(handler)
    monkeypatch.setattr(ray_worker, "print_worker_logs", printer)
    try:
        monkeypatch.setenv(failures.VERBOSE_ENV, "1")
        failures.quiet_ray_output()
        assert ray_worker.print_worker_logs is printer and handler.filters == []
        monkeypatch.delenv(failures.VERBOSE_ENV)
        failures.quiet_ray_output()
        assert isinstance(ray_worker.print_worker_logs, failures.WorkerTracebacks)
        assert [type(f) for f in handler.filters] == [failures.RayRecordsToLog]
    finally:
        logging.getLogger("ray.oneforce_probe").removeHandler(handler)


def test_ray_data_usage_poller_formats_no_traceback_in_its_thread(monkeypatch):
    """Ray Data's usage poller logs every failed query with its traceback, from its own thread; on
    CPython 3.11 that formatting races `ast.parse` on the main thread (`mute_ray_data_usage_poller`
    says how). Muted, a failing poll formats nothing; unmuted, this same check sees the traceback."""
    from ray.data._internal.usage.poller import ClusterMetricsPoller

    def failing() -> int:
        raise ConnectionError("no Prometheus here")

    def tracebacks_formatted() -> list[str]:
        formatted, done = [], threading.Event()

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.exc_info:
                    formatted.append(logging.Formatter().formatException(record.exc_info))
                done.set()

        handler = Capture(level=logging.DEBUG)
        logger = logging.getLogger(failures.RAY_DATA_USAGE_POLLER)
        logger.addHandler(handler)
        try:
            ClusterMetricsPoller({"probe": failing}, interval_s=3600)._start_thread_if_not_running()  # one poll, then asleep
            done.wait(1)
        finally:
            logger.removeHandler(handler)
        return formatted

    from ray._private import worker as ray_worker

    monkeypatch.setattr(logging.getLogger(failures.RAY_DATA_USAGE_POLLER), "level", logging.NOTSET)  # as Ray leaves it
    monkeypatch.setattr(logging.getLogger("ray.data"), "level", logging.DEBUG)  # as Ray Data's logging config sets it
    monkeypatch.setattr(ray_worker, "print_worker_logs", ray_worker.print_worker_logs)  # quiet_ray_output wraps it
    unmuted = tracebacks_formatted()
    assert len(unmuted) == 1 and "ConnectionError: no Prometheus here" in unmuted[0]
    failures.quiet_ray_output()  # what every job's driver calls
    assert tracebacks_formatted() == []
