"""`ray up` for real, on this machine: cluster.yaml's setup, file-mount and start commands (the head's
`mlflow server` included) under Ray's local node provider, over ssh to 127.0.0.1; a toy distillation sent
with `ray job submit`; its MLflow run read back from the head's tracking server; then `ray down`.

    python bench/ray_up_local.py             # prints each phase's time and what the tracking server holds
    python bench/ray_up_local.py --keep      # leave the cluster up (then: ray down -y <workdir>/cluster-local.yaml)

What differs from cluster.yaml, and only this: the provider (local, head 127.0.0.1, no workers), the
ssh user and key, the cluster's name, the node types (the local provider has one), and the paths that
name the cloud machine (/home/ubuntu/oneforce, ~/mlflow, ~/.oneforce/mlflow.env, the S3 artifact
bucket) moved under the work folder; the file mounts are the repository only (Ray's token is this
user's own ~/.ray/auth_token, made if missing). Every command runs as cluster.yaml writes it, token
authentication and the tracking server's password included.

Prerequisites, once: sshd on 127.0.0.1 accepting this user's key without a passphrase
(`ssh -o BatchMode=yes $USER@127.0.0.1 true` succeeds) and rsync. The "cluster" shares this machine's
Python, so the setup command's `pip install -e` points the package at the cluster's copy of the
repository; the script points it back at this checkout when it ends.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.toy_datasets import write_toy_debug_dataset  # noqa: E402 - after the path
CLOUD_REPO = "/home/ubuntu/oneforce"
CLOUD_ARTIFACTS = "s3://YOUR-BUCKET/oneforce/mlflow-artifacts"
DASHBOARD = "http://127.0.0.1:8265"


def local_config(work: Path, key: Path) -> dict:
    """cluster.yaml for Ray's local provider on this machine (see the module doc for what changes)."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mount = str(work / "oneforce")

    def moved(command: str) -> str:
        return (command.replace(CLOUD_REPO, mount).replace(CLOUD_ARTIFACTS, str(work / "mlflow-artifacts"))
                .replace("~/mlflow", str(work / "mlflow")).replace("$HOME/mlflow", str(work / "mlflow"))
                .replace("~/.oneforce/mlflow.env", str(work / "mlflow.env")))

    for name in ("available_node_types", "head_node_type"):
        config.pop(name, None)
    config.update(
        cluster_name="oneforce-local", max_workers=0,
        provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        auth={"ssh_user": getpass.getuser(), "ssh_private_key": str(key)},
        file_mounts={mount: str(REPO)},
    )
    for section in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                    "worker_start_ray_commands"):
        config[section] = [moved(c) for c in config.get(section, [])]
    return config


def job_config(work: Path) -> Path:
    """A toy distillation whose tracking_uri is left empty: the cluster's MLFLOW_TRACKING_URI decides."""
    tree = {
        "name": "ray_up_local",
        "model": {"teacher_arch": "toy-debug", "student_arch": "toy-debug", "critic_arch": "toy-debug", "codec": "patch:4",
                  "num_latent_frames": 3, "latent_height": 8, "latent_width": 8},
        "method": {"gradient_num_blocks": 2, "shift": 3.0, "gen_every": 2,
                   "discriminator": {"feature_layers": [0, 1], "num_heads": 2, "ffn_dim": 32}},
        "data": {"output": str(work / "data")},
        "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 4, "storage_path": str(work / "runs"), "ema_start_step": 0},
        "tracking": {"experiment": "ray-up-local", "sample_every": 4, "sample_prompts": 2},
        "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "teacher_actors": 0},
    }
    path = work / "distill.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def write_secrets(work: Path) -> dict[str, str]:
    """The two secrets cluster.yaml mounts: Ray's token (this user's ~/.ray/auth_token, made if missing,
    which is where the head's `ray start` finds it on this machine) and the tracking server's user and
    password (a fresh file in the work folder). Returns the MLflow credentials."""
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    credentials = {"MLFLOW_TRACKING_USERNAME": "oneforce", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24)}
    path = work / "mlflow.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in credentials.items()))
    path.chmod(0o600)
    return credentials


def run(command: list[str], log: Path, timeout: int = 900, **kwargs) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({result.returncode}); see {log}:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - started, result.stdout + result.stderr


def head_ip() -> str:
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]


def tracked_run(uri: str, credentials: dict[str, str]) -> dict:
    import mlflow
    import requests

    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    without = requests.get(search, timeout=10).status_code
    os.environ.update(credentials)  # what MLflow's client reads
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-up-local").experiment_id])
    run = next(r for r in runs if r.info.run_name == "distill:ray_up_local")
    return {"without credentials": without, "status": run.info.status, "metrics": sorted(run.data.metrics), "params": len(run.data.params),
            "samples": [a.path for a in client.list_artifacts(run.info.run_id, "samples")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster up")
    parser.add_argument("--key", default=str(Path.home() / ".ssh" / "id_ed25519"), help="ssh key the local provider uses")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oneforce-ray-up-"))
    log = work / "ray_up_local.log"
    cluster = work / "cluster-local.yaml"
    cluster.write_text(yaml.safe_dump(local_config(work, Path(args.key)), sort_keys=False))
    write_toy_debug_dataset(work / "data")  # random values: the cluster's plumbing is what this measures
    credentials = write_secrets(work)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}  # as the README submits
    times: dict[str, float] = {}
    print(f"work folder: {work} (log: {log})", flush=True)
    try:
        times["ray up"], _ = run(["ray", "up", "-y", "--no-config-cache", str(cluster)], log, env=env)
        print(f"ray up: {times['ray up']:.0f} s", flush=True)
        uri = f"http://{head_ip()}:5000"
        times["job"], out = run(["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", str(REPO), "--",
                                 "python", "jobs/distill.py", "--config", str(job_config(work))], log, env=env)
        assert "succeeded" in out, out[-2000:]
        print(f"ray job submit (toy distillation, 4 steps): {times['job']:.0f} s", flush=True)
        found = tracked_run(uri, credentials)
        print(f"the head's tracking server ({uri}) holds the run: {json.dumps(found)}", flush=True)
    finally:
        if not args.keep:
            times["ray down"], _ = run(["ray", "down", "-y", str(cluster)], log, env=env)
            subprocess.run(["pkill", "-f", f"mlflow server.*{work}"], check=False)  # ray down stops Ray, not MLflow
            print(f"ray down: {times['ray down']:.0f} s", flush=True)
        # The setup command pointed the editable install at the cluster's copy: point it back here.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True)
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))


if __name__ == "__main__":
    main()
