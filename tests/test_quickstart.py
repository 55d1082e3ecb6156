"""The quickstart (jobs/quickstart.py): stages reused or run again by their keys, a failing stage named in
one line with its log, overrides routed to their stage, and `--fast` end to end as a subprocess, as the
README's first command and CI run it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import quickstart
from jobs.quickstart import Settings, split_overrides
from pipeline.config import ConfigError
from pipeline.stages import Runner, StageFailed

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["model", "adherence", "sharpness", "temporal consistency", "Frechet distance", "s per clip", "first frames (s)"]
STAGE_RUNS = {"preprocess", "ode_init:toy_ode_init", "distill:toy_distill", "generate", "teacher", "evaluate"}


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """The printed markdown table: {model label: {column: value}}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == COLUMNS, header
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = {column: float(value) for column, value in zip(header[1:], cells[1:])}
    return rows


def test_a_finished_stage_is_reused_and_one_whose_settings_changed_runs_again(tmp_path):
    runner = Runner(tmp_path, quickstart.STAGES)
    calls: list[bool] = []

    def body(stage_dir: Path, changed: bool) -> dict:
        calls.append(changed)
        return {"runs": len(calls)}

    first = runner.run("generate", ["settings a"], body, "test", ray=False)
    marker = tmp_path / "stages" / "generate" / "result.json"
    assert calls == [False] and first["runs"] == 1 and json.loads(marker.read_text())["key"] == first["key"]
    assert runner.run("generate", ["settings a"], body, "test", ray=False) == first and calls == [False]
    changed = runner.run("generate", ["settings b"], body, "test", ray=False)
    assert calls == [False, True] and changed["runs"] == 2 and changed["key"] != first["key"]
    assert json.loads(marker.read_text())["result"] == {"runs": 2}


def test_a_failing_stage_prints_one_line_naming_the_stage_and_its_log(tmp_path, capsys, monkeypatch):
    runner = Runner(tmp_path, quickstart.STAGES)
    runner.run("distill", ["old"], lambda d, changed: {"ok": 1}, "test", ray=False)

    def broken(stage_dir: Path, changed: bool) -> dict:
        print("loading the student")
        raise FileNotFoundError("model.student_path=/nowhere: no such file or directory")

    with pytest.raises(StageFailed) as failed:
        runner.run("distill", ["new"], broken, "test", ray=False)
    log = tmp_path / "logs" / "distill.log"
    assert failed.value.stage == "distill" and failed.value.log == log
    text = log.read_text()
    assert "loading the student" in text and "Traceback" in text and "FileNotFoundError" in text
    # The old result no longer describes the disk: a rerun runs the stage, continuing the failed one.
    assert not (tmp_path / "stages" / "distill" / "result.json").exists()
    seen: list[bool] = []
    runner.run("distill", ["new"], lambda d, changed: seen.append(changed) or {}, "test", ray=False)
    assert seen == [False]

    # main turns it into the project's one line (pipeline/failures.py) and exit code 2 (bad input).
    monkeypatch.setattr(quickstart, "install_signal_handlers", lambda: None)  # pytest keeps its Ctrl-C
    def stages(settings: Settings, runner: Runner) -> dict:
        raise failed.value

    monkeypatch.setattr(quickstart, "quickstart", stages)
    monkeypatch.chdir(tmp_path)  # main moves to the repository root; this puts the test's directory back
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        quickstart.main(["--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: stage distill failed: model.student_path=/nowhere: no such file or directory (log: {log}; rerun to resume)"]


def test_overrides_go_to_their_stage_or_to_every_config_stage(tmp_path):
    overrides = split_overrides(["distill.train.steps=3", "ray.address=auto", "generate.generate.seed=5"])
    assert overrides["distill"] == ["train.steps=3", "ray.address=auto"]
    assert overrides["ode_init"] == ["ray.address=auto"] and overrides["generate"] == ["ray.address=auto", "generate.seed=5"]
    settings = Settings(out=tmp_path, fast=True, overrides=overrides)
    assert settings.config("distill").train.steps == 3 and settings.config("ode_init").train.steps == 8
    assert settings.config("generate").generate.seed == 5
    assert settings.config("preprocess").data.output == str(tmp_path / "data")
    with pytest.raises(ConfigError, match="distill stage: unknown config key 'train.nope'"):
        Settings(out=tmp_path, fast=True, overrides=split_overrides(["distill.train.nope=1"])).config("distill")
    with pytest.raises(ConfigError, match="the evaluate stage takes no overrides"):
        split_overrides(["evaluate.world.width=3"])


def run_quickstart(out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "ONEFORCE_LOG_DIR": str(out.parent / "logs")}  # a Ray of its own
    result = subprocess.run([sys.executable, "jobs/quickstart.py", "--fast", "--out", str(out)],
                            capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def test_fast_quickstart_end_to_end_then_a_rerun_reuses_every_stage(tmp_path):
    import mlflow

    from pipeline.video import read_video

    out = tmp_path / "qs"
    first = run_quickstart(out, timeout=1200)
    table = parse_table(first.stdout)
    # Each Train run's bar is drawn while it runs and dropped when it ends (a closed bar drawn again
    # would be redrawn under every later line of the job).
    bars = first.stderr
    assert "toy_ode_init ode_loss" in bars and "toy_distill critic" in bars
    assert bars.rfind("toy_ode_init ode_loss") < bars.find("toy_distill critic")
    assert len(table) == 2 and any(k.startswith("teacher") for k in table) and any(k.startswith("student") for k in table)
    for values in table.values():
        assert all(math.isfinite(v) for v in values.values()) and 0 <= values["adherence"] <= 1
        assert 0 < values["first frames (s)"] <= values["s per clip"]
    store = f"sqlite:///{out / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {store}" in first.stdout

    for model in ("student", "teacher"):
        videos = sorted((out / "videos" / model).glob("*.mp4"))
        assert len(videos) == quickstart.FAST_EVAL_PROMPTS, model
        assert all(read_video(v).shape == (9, 32, 32, 3) for v in videos)
        assert str(out / "videos" / model) in first.stdout
    # The teacher's clips are those of the student's rows: the same prompts and the same noise seeds.
    names = {model: sorted(p.name for p in (out / "videos" / model).glob("*.mp4")) for model in ("student", "teacher")}
    assert names["student"] == names["teacher"]

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(STAGE_RUNS)
    assert {r.info.status for r in runs} == {"FINISHED"}
    evaluate = next(r for r in runs if r.info.run_name == "evaluate")
    assert {"student/adherence", "teacher/adherence", "student/seconds_per_clip"} <= set(evaluate.data.metrics)

    second = run_quickstart(out, timeout=600)
    assert second.stdout.count("done, reused") == len(quickstart.STAGES), second.stdout
    assert parse_table(second.stdout) == table
    assert len(client.search_runs([experiment.experiment_id])) == len(STAGE_RUNS)
