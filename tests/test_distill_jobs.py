"""The training jobs as users run them: `ray job submit ... jobs/distill.py` against the session's
`ray start --head` cluster, its export written; MLflow's store read back (params, every loss, sample
videos, a resumed run appending to the same MLflow run). The chain jobs/ode_init.py -> jobs/distill.py ->
jobs/generate.py on the export, with decoded clips, runs in tests/test_quickstart.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.tracking import check_reachable
from pipeline.video import read_video
from tests.browser import free_port
from tests.test_ray_jobs import REPO, submit
from tests.toy_datasets import FRAMES, write_toy_debug_dataset

LOGGED = ("dmd", "gan_g", "gan_d", "critic_flow", "r1", "r2", "generator_grad_norm", "critic_grad_norm",
          "logits_real", "logits_fake", "dmd_normaliser", "samples_per_s", "s_per_step")


def job_config(tmp: Path, name: str, **sections) -> Path:
    tree = {
        "name": name,
        "model": {"teacher_arch": "toy-debug", "student_arch": "toy-debug", "critic_arch": "toy-debug", "codec": "patch:4",
                  "num_latent_frames": FRAMES, "latent_height": 8, "latent_width": 8},
        "method": {"gradient_num_blocks": 2, "shift": 3.0, "gen_every": 2, "r1_weight": 1.0, "r2_weight": 0.001,
                   "discriminator": {"feature_layers": [0, 1], "num_heads": 2, "ffn_dim": 32}},
        "data": {"output": str(tmp / "data")},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "storage_path": str(tmp / "runs"),
                  "ema_start_step": 0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "sample_every": 2, "sample_prompts": 2},
        "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "teacher_actors": 1, "teacher_resources": {"CPU": 0.5}},
    }
    for section, values in sections.items():
        tree[section].update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_job(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def cluster_tracking_server_command(port: int, home: Path, credentials: Path, artifacts: str) -> str:
    """The head's `mlflow server` command from cluster.yaml, moved to loopback, a free port and `home`,
    with one request worker instead of the default four (each is a process importing MLflow)."""
    command = next(c for c in yaml.safe_load((REPO / "cluster.yaml").read_text())["head_start_ray_commands"] if "mlflow server --" in c)
    moved = (command.replace("$(hostname -I | awk '{print $1}')", "127.0.0.1").replace("--port 5000", f"--port {port}").replace(":5000", f":{port}")
             .replace("~/.oneforce/mlflow.env", str(credentials)).replace("$HOME/mlflow", str(home)).replace("~/mlflow", str(home))
             .replace("s3://YOUR-BUCKET/oneforce/mlflow-artifacts", artifacts).replace("mlflow server ", "mlflow server --workers 1 "))
    assert "0.0.0.0" not in moved and "YOUR-BUCKET" not in moved and "~" not in moved and moved.count("--workers 1") == 1, moved
    return moved


@pytest.fixture
def mlflow_server(s3_server, tmp_path):
    """The tracking server exactly as cluster.yaml starts it on the head (basic authentication, the user
    and password read from a credentials file, artifacts proxied to S3), on loopback: the session's
    MLFLOW_TRACKING_USERNAME / PASSWORD are in this process's environment and the Ray cluster's, as on a
    cluster's nodes. Yields its URI; stopped with its workers at the end."""
    from tests.conftest import SECRETS

    port, home = free_port(), tmp_path / "mlflow-home"
    credentials = tmp_path / "mlflow.env"
    credentials.write_text("".join(f"{k}={SECRETS[k]}\n" for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")))
    credentials.chmod(0o600)
    command = cluster_tracking_server_command(port, home, credentials, f"s3://oneforce-test/mlflow-artifacts-{tmp_path.name}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}  # only the file gives them
    server = subprocess.Popen(["bash", "-c", command], env=env, start_new_session=True)  # bash exits; its group lives on
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                check_reachable(uri, timeout=2)
                break
            except ConnectionError:
                log = home / "server.log"
                assert time.time() < deadline, log.read_text()[-2000:] if log.exists() else command
                time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        credentials.unlink()  # the one file meant to hold them (the session looks for them everywhere else)


def assert_answers_only_with_its_credentials(uri: str) -> None:
    import requests

    from tests.conftest import SECRETS

    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    user = SECRETS["MLFLOW_TRACKING_USERNAME"]
    assert requests.get(search, auth=(user, "a-wrong-password"), timeout=10).status_code == 401
    assert requests.get(search, auth=(user, SECRETS["MLFLOW_TRACKING_PASSWORD"]), timeout=10).status_code == 200


def test_distill_by_ray_job_submit_then_resumed_in_the_same_mlflow_run(ray_cluster, mlflow_server, tmp_path):
    """Logged to a real tracking server over HTTP, started as on a cluster's head (it answers only with
    its credentials, which the job finds in its node's environment); the sample videos through its
    artifact proxy, into S3. The run's checkpoints and export are on S3 too, so the resumed job is a
    relaunch that finds its checkpoint there."""
    import fsspec
    import mlflow

    assert_answers_only_with_its_credentials(mlflow_server)

    write_toy_debug_dataset(tmp_path / "data")
    address = f"ray.address={ray_cluster[0]}"
    storage = f"s3://oneforce-test/jobs-{tmp_path.name}"
    # The student starts from the (random) teacher's weights.
    distill = job_config(tmp_path, "distill", tracking={"tracking_uri": mlflow_server}, train={"storage_path": storage})
    result = submit(ray_cluster[1], ["python", "jobs/distill.py", "--config", str(distill)])
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in log, log[-4000:]
    s3 = fsspec.filesystem("s3")
    s3.invalidate_cache()
    run_root = f"{storage.removeprefix('s3://')}/distill/distill"
    export = {p.rsplit("/", 1)[-1] for p in s3.ls(f"{run_root}/export", detail=False)}
    assert export >= {"transformer", "text_encoder", "tokenizer", "codec", "oneforce.json"}, export

    mlflow.set_tracking_uri(mlflow_server)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["oneforce"], output_format="list")}
    run = runs["distill:distill"]
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "2"
    assert run.data.tags["oneforce.mode"] == "distill" and "oneforce.config_hash" in run.data.tags
    assert set(LOGGED) <= set(run.data.metrics), sorted(run.data.metrics)
    artifacts = {Path(a.path).suffix: a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "samples")}
    assert artifacts.keys() == {".mp4", ".png"}
    sample = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifacts[".mp4"], dst_path=str(tmp_path / "sample"))
    assert read_video(sample).shape[0] == FRAMES  # the EMA student's samples decode

    # The same command with more steps resumes from the checkpoint on S3 and appends to the same MLflow run.
    run_job("jobs/distill.py", "--config", str(distill), address, "train.steps=4")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "critic_flow")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    s3.invalidate_cache()
    assert s3.exists(f"{run_root}/checkpoint_00000004")


def test_an_unreachable_tracking_server_is_one_line_before_anything_starts(tmp_path):
    write_toy_debug_dataset(tmp_path / "data")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = job_config(tmp_path, "unreachable", tracking={"tracking_uri": uri})
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", str(config)], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: tracking.tracking_uri={uri}: the MLflow tracking server does not answer from the driver")
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_resource_plan_and_starts_nothing(tmp_path):
    config = job_config(tmp_path, "plan")
    log = run_job("jobs/distill.py", "--config", str(config), "--dry-run", "ray.teacher_actors=2",
                  "ray.critic_placement=actors", "ray.critic_actors=1", "ray.critic_resources={CPU: 0.5, critic_gpu: 1}")
    assert "plan:" in log and "2 teacher actor(s) (CPU=0.5 each)" in log and "DeepSpeed ZeRO-2" in log
    assert "1 critic actor(s) (CPU=0.5, critic_gpu=1 each)" in log
    assert "\ncritic " in log and "H100" in log and "the step is bound by the" in log  # the capacity table, last
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_exported_settings_sit_under_the_users_config():
    from pipeline.config import load_config

    base = {"model.num_latent_frames": 3, "model.latent_height": 8, "method.shift": 3.0, "method.gradient_num_blocks": 3}
    cfg = load_config(None, ["model.latent_height=16"], base=base)
    assert (cfg.model.num_latent_frames, cfg.model.latent_height, cfg.method.shift) == (3, 16, 3.0)
