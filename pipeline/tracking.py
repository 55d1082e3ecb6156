"""Experiment tracking behind a two-method interface: MLflow, or nothing.

Jobs call `open_tracker(cfg.tracking, run_dir)`; rank 0 gets an `MLflowTracker`, other ranks and
`tracking_uri: none` a `NullTracker`. The MLflow run id is written into `run_dir`, so relaunching the
same run appends to the same MLflow run instead of starting a new one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import TrackingConfig
from pipeline.failures import run_status


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
    def __init__(self, cfg: TrackingConfig, run_dir: str, params: dict[str, Any], run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        # MLflow 3 no longer writes plain-file stores; a local SQLite file is the zero-setup default.
        mlflow.set_tracking_uri(cfg.tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}")
        mlflow.set_experiment(cfg.experiment)
        id_file = Path(run_dir) / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.run_name or run_name))
        if run_id is None:
            mlflow.log_params(_flatten(params))
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run.info.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(path, artifact_path)

    def close(self, status: str | None = None) -> None:
        """End the run as `status`; by default FAILED when called (from a `finally`) while an exception
        propagates, KILLED while Ctrl-C/SIGTERM does, else FINISHED."""
        self._mlflow.end_run(status=status or run_status(sys.exc_info()[1]))


def open_tracker(cfg: TrackingConfig, run_dir: str, params: dict[str, Any], run_name: str, rank: int = 0) -> Tracker:
    if rank != 0 or cfg.tracking_uri == "none" or os.environ.get("ONEFORCE_NO_MLFLOW"):
        return NullTracker()
    return MLflowTracker(cfg, run_dir, params, run_name)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ("train.lr": "1e-05"); MLflow caps values at 6000 chars."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:6000]
    return flat
