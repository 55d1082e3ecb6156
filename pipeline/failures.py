"""What every job does when it fails or is stopped: one line on stderr, the truth in a log and in MLflow.

`jobs/cli.py`'s `run_main` calls `run_guarded`, so each job gets the same behaviour:

- an exception, raised on the driver or inside a Ray task, actor, Ray Data stage or Ray Train worker,
  is unwrapped to the user's own error (`cause`) and printed as one line,
  `error: <message> (traceback: <log file>)`; the full traceback goes to the log file. Bad input
  (ValueError, OSError, KeyError: a path, a file, a config value) exits with code 2, anything else
  (a bug) with code 1.
- SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt) on the driver; the job's `finally`
  blocks run (trackers close as KILLED, generate flushes its manifest), then one line,
  `interrupted: <detail>`, and exit code 128 + the signal number.
- an MLflow run still open when the job ends is ended FAILED or KILLED, not FINISHED.
- jobs start Ray with `init_ray`: the workers' output still reaches the terminal (progress bars,
  prints), but the tracebacks a failing worker prints, and Ray's own error records on the driver, go to
  the same log file instead of printing a few hundred lines above the one-line error.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
INPUT_ERRORS = (ValueError, OSError, KeyError)

# A traceback's "module.Type: message" line, as Ray's wrappers carry a remote error in text only.
_ERROR_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (?P<message>.*)$")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM on the driver, or a job's own summary of what an interruption kept."""

    def __init__(self, detail: str, signum: int = signal.SIGINT) -> None:
        super().__init__(detail)
        self.detail, self.signum = detail, signum


@dataclass(frozen=True)
class Cause:
    """The error the user has to act on, however deeply Ray wrapped it."""

    type_name: str
    message: str
    bad_input: bool

    def line(self) -> str:
        # Input errors carry their own wording ("data.prompts=...: no such file"); a bug keeps its type.
        text = self.message if self.bad_input and self.message else f"{self.type_name}: {self.message}"
        return text.strip().splitlines()[0] if text.strip() else self.type_name


def _is_ray_wrapper(err: BaseException) -> bool:
    return type(err).__module__.startswith("ray.")


def _inner(err: BaseException) -> BaseException | None:
    """The exception `err` wraps, if Ray (core, Data or Train) wrapped one."""
    for attr in ("cause", "controller_failure", "_base_exc", "health_check_failure"):
        inner = getattr(err, attr, None)
        if isinstance(inner, BaseException):
            return inner
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]  # the lowest rank's error; the others usually repeat it
    if _is_ray_wrapper(err) and isinstance(err.__cause__, BaseException) and not _is_ray_wrapper(err.__cause__):
        return err.__cause__
    return None


def unwrap(err: BaseException) -> list[BaseException]:
    """`err` and what it wraps, following Ray's wrappers (RayTaskError.cause, Train's worker_failures,
    ...) down to the user's error, which comes last."""
    chain = [err]
    while (inner := _inner(chain[-1])) is not None and all(inner is not e for e in chain):
        chain.append(inner)
    return chain


def _parsed(text: str) -> tuple[str, str] | None:
    """(type, message) of the last non-Ray error in a traceback printed into a message: Ray keeps only
    the text of an actor's constructor error (ActorDiedError) or of a Ray Data UDF's error. The last
    one is what the user's code raised (a chained traceback prints the causes first)."""
    found = None
    for line in text.splitlines():
        match = _ERROR_LINE.match(line)
        if match and not match["type"].startswith("ray."):
            found = match["type"], match["message"]
    return found


def _is_input_error_name(type_name: str) -> bool:
    name = type_name.rsplit(".", 1)[-1]
    known = getattr(builtins, name, None)
    if isinstance(known, type) and issubclass(known, BaseException):
        return issubclass(known, INPUT_ERRORS)
    return name in ("ConfigError", "StorageError")


def cause(err: BaseException) -> Cause:
    from pipeline.storage import storage_cause  # storage imports fsspec; keep this module light

    chain = unwrap(err)
    inner = chain[-1]
    if _is_ray_wrapper(inner):
        # Innermost text first: a wrapper's message repeats the remote traceback it was built from.
        for parsed in (_parsed(str(e)) for e in reversed(chain)):
            if parsed:
                return Cause(parsed[0], parsed[1], _is_input_error_name(parsed[0]))
    storage = storage_cause(inner)
    if storage:
        return Cause(type(inner).__name__, storage, True)
    message = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)
    return Cause(type(inner).__name__, message, isinstance(inner, INPUT_ERRORS))


@contextlib.contextmanager
def about(field: str, value: str) -> Iterator[None]:
    """Name the config key `field` (set to `value`) in an input error raised inside the block, unless
    the message names it already (the key, or the value as its first word): a loader deep in a library
    (diffusers: "Cannot load  because ...", "Unable to load weights from checkpoint file for '<a file
    inside value>'") does not know which setting gave it its path."""
    try:
        yield
    except INPUT_ERRORS as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if field in message or (value and message.startswith(value)):  # it names the input already
            raise
        try:
            named = type(err)(f"{field}={value}: {message}")
        except TypeError:  # an exception type with its own constructor arguments
            named = ValueError(f"{field}={value}: {message}")
        raise named from err


def log_dir() -> Path:
    """Where failure logs go: $ONEFORCE_LOG_DIR, else ~/.cache/oneforce/logs."""
    if os.environ.get("ONEFORCE_LOG_DIR"):
        return Path(os.environ["ONEFORCE_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "oneforce" / "logs"


_log_lock = threading.Lock()
_log_path: Path | None = None  # this process's log file, named on first use


def log_path(job: str | None = None) -> Path:
    """This job's log file (one per process; written only when there is something to keep)."""
    global _log_path
    with _log_lock:
        if _log_path is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = job or Path(sys.argv[0]).stem or "job"
            _log_path = log_dir() / f"{name}-{stamp}-{os.getpid()}.log"
        return _log_path


def append_log(text: str, job: str | None = None) -> Path:
    """Append `text` to the job's log file, which starts with the command line."""
    path = log_path(job)
    with _log_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a") as f:
            f.write((f"{' '.join(sys.argv)}\n\n" if new else "\n") + text.rstrip("\n") + "\n")
    return path


def write_log(err: BaseException, job: str) -> Path:
    """The full traceback (Ray's remote tracebacks included: they are in the exceptions' text), after
    whatever worker output the job's log already holds."""
    return append_log("".join(traceback.format_exception(err)), job)


# ---------------------------------------------------------------------------------------------------
# Ray's output on the driver: worker tracebacks and Ray's error records to the log, the rest as usual
# ---------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the wrapper line of a remote traceback
# A line that starts a traceback, Ray's report of an actor or task that failed with one, or an error
# record in Ray's log format (a Train controller's "training failed", whose traceback follows).
_TRACEBACK_START = re.compile(
    r"Traceback \(most recent call last\)|Exception raised in creation task|^\s*ray::\S+\(\) \(pid=|^\S+ \S+\s+ERROR \S+:\d+ -- "
)
# Lines that continue one: frames and code (indented), blank lines, carets, chained-exception
# headers, the final "Type: message" line and Ray's wrapper lines around a remote traceback.
_TRACEBACK_GOES_ON = re.compile(
    r"^(\s|$|\^|The above exception|During handling of the above|ray::|\(pid=)|^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b"
)


# Ray's own processes whose stderr every driver of the cluster receives (the log monitor tails their
# .err files): the GCS's records about other jobs' actors reach this job's terminal otherwise.
_RAY_SYSTEM_PROCESSES = ("raylet", "gcs_server")
# Ray's own actors in a job: Ray Train's controller ("Requesting resources", "Started training worker group")
# and Ray Data's split coordinator (a dataset's plan): their records are Ray's, for the log.
_RAY_SYSTEM_ACTORS = ("TrainController", "SplitCoordinator")
_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray.RAY_TQDM_MAGIC
# A record of Ray's C++ core in a worker's stderr: "[2026-01-01 10:00:00,000 W 12 34] core_worker.cc:1: ..."
_RAY_NATIVE_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]")


class WorkerTracebacks:
    """Wraps Ray's printer of the workers' output on the driver (batches of lines per worker and
    stream, and the raylet's and GCS's records): tracebacks and Ray's own records go to the job's log
    file, everything else (progress bars, prints, warnings) to the terminal as before, with Ray's
    prefixes."""

    def __init__(self, print_lines: Callable[..., None]) -> None:
        self.print_lines = print_lines
        self.in_traceback: set[tuple] = set()  # (worker, stream) whose last batch ended inside one
        self.closed_bars: set[str] = set()

    def __call__(self, data: dict, print_file: object, *args: object, **kwargs: object) -> None:
        key = (data.get("ip"), data.get("pid"), data.get("is_err"))
        inside = key in self.in_traceback
        system = data.get("pid") in _RAY_SYSTEM_PROCESSES or data.get("actor_name") in _RAY_SYSTEM_ACTORS
        shown, logged = [], []
        for line in data.get("lines", []):  # a raylet report is one "line" holding a whole traceback
            if self.is_stale_bar_state(line):
                continue
            plain = _ANSI.sub("", line)
            if _TRACEBACK_START.search(plain):
                inside = True
            elif inside and not _TRACEBACK_GOES_ON.match(plain):
                inside = False
            (logged if inside or system or _RAY_NATIVE_RECORD.match(plain) else shown).append(line)
        (self.in_traceback.add if inside else self.in_traceback.discard)(key)
        if logged:
            who = data.get("actor_name") or data.get("task_name") or data.get("pid") or "worker"
            try:
                append_log(f"[{who} pid={data.get('pid')} ip={data.get('ip')}]\n" + "\n".join(logged))
            except OSError:  # no log folder: the terminal keeps them rather than losing them
                shown = data.get("lines", [])
        if shown:
            self.print_lines({**data, "lines": shown}, print_file, *args, **kwargs)

    def is_stale_bar_state(self, line: str) -> bool:
        """A tqdm_ray state line of a bar already closed. A Ray Train worker's output reaches the driver
        twice (its .out and .err files), and Ray's bar manager draws a second "closed" state as a new
        bar that nothing closes: every later line on the terminal would redraw it."""
        if _TQDM_MAGIC not in line:
            return False
        try:
            state = json.loads(line)
        except ValueError:
            return False
        uuid = state.get("uuid")
        if uuid in self.closed_bars:
            return True
        if state.get("closed"):
            self.closed_bars.add(uuid)
        return False


class RayRecordsToLog(logging.Filter):
    """On a console handler of Ray's driver loggers: info records ("Connecting to existing Ray cluster",
    Ray Data's plans and progress on a non-terminal) and error records and tracebacks (Ray Data's "Full
    stack trace", "actors died during initialization") go to the job's log file; the error reaches the
    user as run_guarded's one line, progress as the job's own bars. Warnings still print."""

    _format = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and not record.exc_info:
            return True
        try:
            append_log(self._format.format(record))
        except OSError:
            return True
        return False


VERBOSE_ENV = "ONEFORCE_VERBOSE"  # set by a job's --verbose: Ray's output prints as Ray prints it


# Ray Data's driver-side usage poller: a daemon thread that asks the cluster's Prometheus for spill
# and node-failure counters every 10 s, for as long as the process lives, and logs each failed query at
# DEBUG with its traceback (ray-data.log).
RAY_DATA_USAGE_POLLER = "ray.data._internal.usage.poller"


def mute_ray_data_usage_poller() -> None:
    """Keep Ray Data's usage poller from formatting a traceback every 10 s in its own thread. Where no
    Prometheus answers (a cluster without one, a test session) every query fails. On CPython 3.11,
    formatting a traceback calls `ast.parse` (for the carets), and the AST constructor's recursion
    counter is shared by the interpreter's threads: a parse on the main thread at the same moment fails
    with `SystemError: AST constructor recursion depth mismatch`. That ended a test session once, in
    pytest's own import of a plugin; a spy on `ast.parse` found this thread the only other caller in the
    process. The poller's other records still log."""
    logging.getLogger(RAY_DATA_USAGE_POLLER).setLevel(logging.INFO)


def quiet_ray_output() -> None:
    """Route Ray's output on the driver as `WorkerTracebacks` and `RayRecordsToLog` say, unless the job
    runs with --verbose. Ray has no public hook for the workers' output short of dropping all of it
    (`log_to_driver=False`, which also drops the Train workers' progress bar), so this wraps
    `ray._private.worker.print_worker_logs`; where another Ray version lacks it, the workers' output
    prints as Ray prints it."""
    mute_ray_data_usage_poller()  # with --verbose too: it is a thread-safety fix, not output routing
    if os.environ.get(VERBOSE_ENV):
        return
    import ray.data  # noqa: F401 - configures Ray Data's console logger, which gets the filter below

    for name in ["ray", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("ray."))]:
        for handler in logging.getLogger(name).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, RayRecordsToLog) for f in handler.filters):
                handler.addFilter(RayRecordsToLog())
    try:  # both the worker-output thread and the error thread print through this one function
        from ray._private import worker as ray_worker

        printer = ray_worker.print_worker_logs
    except (ImportError, AttributeError):
        return
    if not isinstance(printer, WorkerTracebacks):
        ray_worker.print_worker_logs = WorkerTracebacks(printer)


def init_ray(address: str = "") -> None:
    """`ray.init` for a job's driver (a no-op when Ray is up), with Ray's output routed by
    `quiet_ray_output`: a worker's failure reaches the terminal once, as the job's one-line error."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray_output()  # first: ray.init's own records ("Connecting to ...") are routed too
    ray.init(address=address or None)


def interrupt_signal(err: BaseException) -> int | None:
    """The signal that stopped the job, if `err` is how a signal arrived: our `Interrupted`, a plain
    KeyboardInterrupt, or the SystemExit(signum) that `ray.init`'s own SIGTERM handler raises."""
    if isinstance(err, Interrupted):
        return err.signum
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    # Only SIGTERM's number: exit code 2 (bad input) is also SIGINT's, and Ctrl-C arrives as
    # KeyboardInterrupt (or as Ray Train's exit, which `trainer.fit` turns into `Interrupted`).
    if isinstance(err, SystemExit) and err.code == signal.SIGTERM:
        return int(err.code)
    return None


def run_status(err: BaseException | None) -> str:
    """The MLflow status of a run ending with `err` in flight (None: ended normally)."""
    if err is None or (isinstance(err, SystemExit) and err.code in (0, None)):
        return "FINISHED"
    return "KILLED" if interrupt_signal(err) is not None else "FAILED"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(f"{signal.Signals(signum).name}; stopped", signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` on the main thread, so `finally` blocks run. (ray.init
    replaces the SIGTERM handler with sys.exit(15); `interrupt_signal` reads that as SIGTERM too.)"""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)


def end_open_mlflow_run(err: BaseException | None) -> None:
    """End an MLflow run a job left open with the status its end deserves (MLflow's own exit hook
    would mark it FINISHED)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status=run_status(err))


def report(err: BaseException, job: str) -> int:
    """Print the one line for `err` and return the exit code."""
    signum = interrupt_signal(err)
    if signum is not None:
        detail = err.detail if isinstance(err, Interrupted) else f"{signal.Signals(signum).name}; stopped"
        print(f"interrupted: {detail}", file=sys.stderr)
        return 128 + signum
    found = cause(err)
    try:
        where = f" (traceback: {write_log(err, job)})"
    except OSError as log_err:  # an unwritable log folder must not hide the error itself
        where = f" (no traceback log: {log_err})"
    print(f"error: {found.line()}{where}", file=sys.stderr)
    return EXIT_BAD_INPUT if found.bad_input else EXIT_BUG


def run_guarded(body: Callable[[], None], job: str) -> None:
    """Run a job's body with the handlers above; exits the process on failure or interruption."""
    install_signal_handlers()
    log_path(job)  # names the log after the job, before Ray's output may go there
    try:
        body()
    except BaseException as err:  # noqa: BLE001 - every way out gets the one-line treatment
        if isinstance(err, SystemExit) and interrupt_signal(err) is None:
            end_open_mlflow_run(err)
            raise
        end_open_mlflow_run(err)
        code = report(err, job)
        sys.stdout.flush()
        sys.stderr.flush()
        if interrupt_signal(err) is not None:
            # The job's cleanup has run. Ray's exit hooks, run while its Data threads still stream, can
            # abort the driver after a SIGTERM (exit -6 instead of 143); the cluster reclaims a gone
            # driver's actors and tasks either way.
            os._exit(code)
        sys.exit(code)
    end_open_mlflow_run(None)
    if _log_path is not None and _log_path.exists():  # e.g. a worker that failed and was retried
        print(f"note: Ray reported errors it recovered from (a retried task, a restarted actor): {_log_path}", file=sys.stderr)
