"""Keyed stages: a chain of jobs run in order, each once, reused on a rerun while its settings hold.

The quickstart's six stages and the claims bench's variants are such chains. Each stage has a key (a
digest of its settings and of the stages it depends on); a finished stage leaves

    ROOT/<folder>/<name>/result.json    its key and result (JSON), written atomically when it ends
    ROOT/<folder>/<name>/started.json   the key it last started with (tells "continuing" from "changed")
    ROOT/logs/<name>.log                its printed output and, on failure, the traceback

and a rerun with the same key returns the stored result without running it. A stage that fails raises
`StageFailed` naming itself and its log; the caller prints the project's one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.failures import interrupt_signal, log_path as job_log_path, quiet_ray_output


class StageFailed(Exception):
    def __init__(self, stage: str, log: Path, error: BaseException) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage, self.log, self.error = stage, log, error


def digest(material: Any) -> str:
    """A short, stable key of JSON-able settings."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` under a temporary name beside `path`, then rename: a reader sees all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Tee(io.TextIOBase):
    """Writes to the console and, until the stage ends, to its log file. (A logging handler created
    during a stage keeps this stream after it: then it writes to the console only.)"""

    def __init__(self, console, log) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        if self.log is not None:
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        if self.log is not None:
            self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.console, "encoding", "utf-8")


@contextlib.contextmanager
def teed(log_path: Path) -> Iterator[Any]:
    """The stage's printed output (its own, and Ray workers' lines forwarded to the driver) also goes to
    its log; the log file is yielded for the traceback."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        stdout, stderr = sys.stdout, sys.stderr
        tees = _Tee(stdout, log), _Tee(stderr, log)
        sys.stdout, sys.stderr = tees
        try:
            yield log
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            for tee in tees:
                tee.log = None


class Runner:
    """Runs stages under `root`, each once: a stage whose result file carries the same key is reused.
    Stages named in `order` print as "[i/n] name"; `folder` holds their records."""

    def __init__(self, root: Path, order: Sequence[str] = (), address: str = "", folder: str = "stages") -> None:
        self.root, self.order, self.address, self.folder = Path(root), tuple(order), address, folder
        self.ray_started = False

    def ensure_ray(self) -> None:
        """Started once, by the first stage that needs it (a rerun that reuses every stage starts none).
        A local instance of our own unless told otherwise (`address`, or RAY_ADDRESS as under `ray job
        submit`): never a cluster someone else started on this machine."""
        import ray
        import ray.data

        if ray.is_initialized():
            return
        ray.init(address=self.address or os.environ.get("RAY_ADDRESS") or "local", configure_logging=False)
        quiet_ray_output()  # as every job: Ray workers' tracebacks go to a log file, not to the terminal
        ray.data.DataContext.get_current().enable_progress_bars = False  # each stage shows its own bar
        self.ray_started = True

    def marker(self, stage: str, name: str = "result.json") -> Path:
        return self.root / self.folder / stage / name

    def log(self, stage: str) -> Path:
        return self.root / "logs" / f"{stage}.log"

    def label(self, stage: str) -> str:
        return f"[{self.order.index(stage) + 1}/{len(self.order)}] {stage}" if stage in self.order else stage

    def run(
        self, stage: str, key_material: Any, body: Callable[[Path, bool], dict[str, Any]], what: str, ray: bool = True
    ) -> dict[str, Any]:
        """`body(stage_dir, changed)` returns the stage's result (JSON), kept beside its key; the result
        comes back with its `key` and the `seconds` it took. `changed`: what the stage left on disk
        (finished or not) was made with other settings or earlier stages."""
        label, key = self.label(stage), digest(key_material)
        marker, started_file = self.marker(stage), self.marker(stage, "started.json")
        previous = json.loads(marker.read_text()) if marker.exists() else None
        if previous and previous["key"] == key:
            print(f"{label}: done, reused ({previous['seconds']:.0f} s when it ran; {marker})", flush=True)
            return {**previous["result"], "key": key, "seconds": previous["seconds"]}
        last_key = json.loads(started_file.read_text())["key"] if started_file.exists() else None
        changed = last_key is not None and last_key != key
        log_path = self.log(stage)
        print(f"{label}: {what}   (log: {log_path})", flush=True)
        if changed:
            print(f"{label}: its settings or an earlier stage changed since it last ran; running it again", flush=True)
        elif last_key is not None:
            print(f"{label}: continuing where it stopped", flush=True)
        marker.unlink(missing_ok=True)  # from here on it would not describe what is on disk
        write_atomic(started_file, json.dumps({"key": key}))
        started = time.perf_counter()
        with teed(log_path) as log:
            try:
                if ray:
                    self.ensure_ray()
                result = body(marker.parent, changed)
            except BaseException as err:  # noqa: BLE001 - recorded, then reported as one line by the caller
                log.write("".join(traceback.format_exception(err)))
                if job_log_path().exists():
                    log.write(f"Ray workers' tracebacks and Ray's error records: {job_log_path()}\n")
                if interrupt_signal(err) is not None:
                    raise
                raise StageFailed(stage, log_path, err) from err
        seconds = time.perf_counter() - started
        write_atomic(marker, json.dumps({"stage": stage, "key": key, "seconds": seconds,
                                         "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}, indent=1))
        print(f"{label}: finished in {seconds:.0f} s", flush=True)
        return {**result, "key": key, "seconds": seconds}

    def shutdown(self) -> None:
        """Stop the Ray instance this runner started (none if every stage was reused)."""
        if self.ray_started:
            import ray

            ray.shutdown()


def stage_tracker(tracking: TrackingConfig, stage_dir: Path, params: dict[str, Any], name: str):
    """The stage's MLflow run; its id kept in the stage's folder, so a stage that is run again appends
    to the same run (the training jobs keep theirs in their run directory)."""
    from pipeline.tracking import open_tracker

    return open_tracker(tracking, str(stage_dir), params, name)
