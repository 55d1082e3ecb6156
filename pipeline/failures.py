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
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import re
import signal
import sys
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
    the message names it already: a loader deep in a library (diffusers: "Cannot load  because ...")
    does not know which setting gave it its path."""
    try:
        yield
    except INPUT_ERRORS as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if field in message or (value and value in message):
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


def write_log(err: BaseException, job: str) -> Path:
    """The full traceback (Ray's remote tracebacks included: they are in the exceptions' text)."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"{job}-{stamp}-{os.getpid()}.log"
    path.write_text(f"{' '.join(sys.argv)}\n\n{''.join(traceback.format_exception(err))}")
    return path


def interrupt_signal(err: BaseException) -> int | None:
    """The signal that stopped the job, if `err` is how a signal arrived: our `Interrupted`, a plain
    KeyboardInterrupt, or the SystemExit(signum) that `ray.init`'s own SIGTERM handler raises."""
    if isinstance(err, Interrupted):
        return err.signum
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(err, SystemExit) and err.code in (signal.SIGTERM, signal.SIGINT):
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
