"""MLflow tracking: where a local store keeps a run's artifacts."""

from __future__ import annotations

import mlflow

from pipeline.config import TrackingConfig
from pipeline.tracking import MLflowTracker


def test_a_local_store_keeps_artifacts_beside_its_database_not_in_the_working_directory(tmp_path, monkeypatch):
    store, elsewhere = tmp_path / "store", tmp_path / "cwd"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a job started from a checkout
    uri = f"sqlite:///{store / 'mlflow.db'}"
    (tmp_path / "table.md").write_text("| a |\n")
    ids = []
    for run in ("first", "second"):  # the second finds the experiment the first created
        tracker = MLflowTracker(TrackingConfig(tracking_uri=uri, experiment="quickstart"), str(tmp_path / run), {}, run)
        tracker.log_artifact(str(tmp_path / "table.md"))
        tracker.close()
        ids.append(tracker.run_id)
    assert list(elsewhere.iterdir()) == []  # MLflow's default would be ./mlruns here
    client = mlflow.MlflowClient(uri)
    for run_id in ids:
        artifacts = client.get_run(run_id).info.artifact_uri
        assert artifacts == (store / "mlartifacts" / run_id / "artifacts").as_uri()
        assert (store / "mlartifacts" / run_id / "artifacts" / "table.md").read_text() == "| a |\n"
