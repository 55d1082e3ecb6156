"""Experiment tracking behind a two-method interface: MLflow, or nothing.

Jobs call `open_tracker(cfg.tracking, run_dir)`; rank 0 gets an `MLflowTracker`, other ranks and
`tracking_uri: none` a `NullTracker`. The MLflow run id is written into `run_dir` (local or s3://), so
relaunching the same run appends to the same MLflow run instead of starting a new one. Training jobs
own their run on the driver; the Train worker of rank 0 logs into it through an `AttachedTracker`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import fsspec

from pipeline.config import TrackingConfig
from pipeline.failures import run_status
from pipeline.storage import is_local


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def close(self, status: str | None = None) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str | None = None) -> None:
        pass


class MLflowTracker:
    def __init__(
        self, cfg: TrackingConfig, run_dir: str, params: dict[str, Any], run_name: str,
        tags: dict[str, str] | None = None, uri: str | None = None,
    ) -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = uri or tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        use_experiment(self.uri, cfg.experiment)
        fs, id_path = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/mlflow_run_id")  # local or s3://
        run_id = fs.cat(id_path).decode().strip() if fs.exists(id_path) else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.run_name or run_name))
        if run_id is None:
            mlflow.log_params(_flatten(params))
            mlflow.set_tags(tags or {})
            fs.makedirs(fs._parent(id_path), exist_ok=True)
            fs.pipe(id_path, self.run.info.run_id.encode())

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(path, artifact_path)

    def close(self, status: str | None = None) -> None:
        """End the run as `status`; by default FAILED when called (from a `finally`) while an exception
        propagates, KILLED while Ctrl-C/SIGTERM does, else FINISHED."""
        self._mlflow.end_run(status=status or run_status(sys.exc_info()[1]))


class AttachedTracker:
    """Logs into a run that another process owns (a Train worker into the driver's run): it never
    changes the run's status."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self._client, self.run_id = MlflowClient(uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, path, artifact_path)

    def close(self, status: str | None = None) -> None:
        pass


def use_experiment(uri: str, name: str) -> None:
    """Make `name` the active MLflow experiment, creating it when it is new. A new experiment in a local
    SQLite store keeps its artifacts beside the database (`<its folder>/mlartifacts`, the name `mlflow
    server` gives its own), not in MLflow's default `./mlruns` of whatever directory the job ran in: a
    store is then one folder, and a job run from a checkout writes nothing into it."""
    import mlflow

    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        try:
            mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
        except mlflow.exceptions.MlflowException as err:  # another job created it meanwhile
            if mlflow.get_experiment_by_name(name) is None:
                raise err
    mlflow.set_experiment(name)


def tracking_uri(cfg: TrackingConfig, store_dir: str = ".") -> str:
    """`tracking.tracking_uri`; else MLFLOW_TRACKING_URI (cluster.yaml sets it on every node to the head's
    `mlflow server`); else a SQLite file `mlflow.db` in `store_dir` when that is local (MLflow 3 writes no
    plain-file stores), else in the working directory."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    fs, path = fsspec.core.url_to_fs(store_dir)
    folder = Path(path) if is_local(fs) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def check_reachable(uri: str, where: str = "the driver", timeout: float = 5.0) -> None:
    """A tracking server (http:// or https://) answers its health check within `timeout` s, or one line
    naming the URI and where it was tried from. (MLflow's own client retries for minutes first.) A
    database or file store is local to whoever opens it: nothing to check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            cause = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        cause = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        cause = str(getattr(err, "reason", err))
    raise ConnectionError(f"tracking.tracking_uri={uri}: the MLflow tracking server does not answer from {where} ({cause})")


def open_tracker(cfg: TrackingConfig, run_dir: str, params: dict[str, Any], run_name: str, rank: int = 0) -> Tracker:
    if rank != 0 or cfg.tracking_uri == "none" or os.environ.get("ONEFORCE_NO_MLFLOW"):
        return NullTracker()
    return MLflowTracker(cfg, run_dir, params, run_name)


_CREDENTIAL_KEY = re.compile(r"(^|_)(pass(word|wd)?|secret|token|credentials?|api_?key|access_?key|private_?key)(_|$)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@", re.IGNORECASE)
REDACTED = "<redacted>"


def redacted(key: str, value: str) -> str:
    """A config value as it may be written down: hidden when its key names a credential, and a URL's
    password (scheme://user:password@host) cut out wherever it appears."""
    if _CREDENTIAL_KEY.search(key.rsplit(".", 1)[-1]) and value not in ("", "None"):
        return REDACTED
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ("train.lr": "1e-05"), credentials redacted; MLflow caps values at
    6000 chars."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = redacted(f"{prefix}{key}", str(value))[:6000]
    return flat
