"""Shared fixtures: tiny Wan models built in code (no downloads), and a local S3 server when asked."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.failures import mute_ray_data_usage_poller
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.wan_weights import WAN_CONFIGS
from tests.browser import free_port

# Ray Train's controller looks at its workers every 2 s by default, so a run that has finished waits up
# to 2 s more to be noticed; the suite runs ~30 short runs, on Ray clusters that inherit this process's
# environment (the session's head, the quickstart's own instance).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Each worker group also gets an actor that watches for cloud nodes being drained (spot preemption):
# one more process per group start (~3 s of CPU to import Ray Train), with nothing to watch on one machine.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# No usage reports from a test session (`ray start --disable-usage-stats` does not reach Ray Data,
# which otherwise starts a usage-collection actor on every cluster the suite starts).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# This process is a Ray driver too (tests run Ray Data in it): as in every job's driver.
mute_ray_data_usage_poller()


def _share_the_cores_between_xdist_workers() -> None:
    """Each pytest-xdist worker (and what it starts: job subprocesses, the session's Ray head) gets its
    share of the cores for torch's threads. By default every process takes all of them, and OpenMP's
    threads then spin-wait for cores the other worker holds: on 2 cores and 2 workers the in-process
    tests took 1.4x the wall time and 1.7x the CPU (bench/RESULTS.md, "the suite's time, session 16")."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_xdist_workers()


def tiny_wan(seed: int = 0, **overrides) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel(**{**WAN_CONFIGS["tiny"], **overrides}).eval()


@pytest.fixture
def tiny_model() -> CausalWanModel:
    return tiny_wan()


# The servers a test may start (Ray's head and its processes, moto, MLflow's server and its workers):
# a test that starts one stops it, and the session checks at its end that none is left. Ours are told
# apart from another test session's on the same machine by a token in their environment, which every
# process started from this one inherits (Ray's workers from the raylet).
_SESSION_TOKEN = "ONEFORCE_TEST_SESSION"
_CLUSTER_TAG = "ONEFORCE_TEST_CLUSTER"  # which Ray cluster of the session a process belongs to
_SERVER = re.compile(r"ray start|raylet|gcs_server|ray::|ray/dashboard|log_monitor|runtime_env|moto\.server|mlflow|gunicorn|uvicorn")
# What the stack writes to the temp folder when it ignores TMPDIR (Ray's session and lock folders,
# multiprocessing's, tempfile's, ours, torch's compile cache, MLflow's): new ones in the machine's /tmp
# or /dev/shm (where MLflow's server puts its job queues) fail the run. (Other programs' files in a shared
# /tmp are not the suite's business.)
_OURS_IN_TMP = re.compile(r"ray|_ray_lockfiles|pymp-.*|tmp.*|oneforce.*|torchinductor_.*|mlflow.*")
_SHM = Path("/dev/shm")
# What a job run from the checkout would leave there (MLflow's default ./mlruns, a store, runs, logs):
# the tests write only into their own folders.
_CHECKOUT = Path(__file__).resolve().parents[1]
_OURS_IN_CHECKOUT = re.compile(r"mlruns|mlartifacts|mlflow\.db|runs|.*\.log")
_SHARED_BEFORE = pytest.StashKey[dict[str, set[str]]]()


# Credentials every process of the session sees, as a cluster's nodes see theirs (cluster.yaml exports the
# MLflow ones into every node's Ray; AWS's come from the environment): marker values that the session
# looks for, at its end, in every file the tests wrote. A job must never write one anywhere.
_SECRET_PREFIX = f"oneforce-secret-{secrets.token_hex(6)}-"
SECRETS = {
    "AWS_ACCESS_KEY_ID": f"{_SECRET_PREFIX}aws-key-id",
    "AWS_SECRET_ACCESS_KEY": f"{_SECRET_PREFIX}aws-secret-key",
    "MLFLOW_TRACKING_USERNAME": "oneforce-tests",
    "MLFLOW_TRACKING_PASSWORD": f"{_SECRET_PREFIX}mlflow-password",
}


def _files_holding_secrets(roots: list[Path], since: float) -> list[str]:
    """Files under `roots` written since `since` that contain a secret marker (all share one prefix)."""
    needle, found = _SECRET_PREFIX.encode(), []
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            try:
                if path.is_symlink() or not path.is_file() or path.stat().st_mtime < since:
                    continue
                with open(path, "rb") as f:
                    tail = b""
                    while chunk := f.read(1 << 23):
                        if needle in tail + chunk:
                            found.append(str(path))
                            break
                        tail = chunk[-len(needle):]
            except OSError:  # a socket, or gone meanwhile
                continue
    return found


def _processes_with(variable: str, value: str) -> list[tuple[psutil.Process, str]]:
    """(process, command line) of every other process whose environment sets `variable` to `value`."""
    me, found = os.getpid(), []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.info["pid"] != me and proc.environ().get(variable) == value:
                found.append((proc, " ".join(proc.info["cmdline"] or [])))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _our_servers(token: str) -> list[str]:
    return [f"pid {proc.pid}: {command[:160]}" for proc, command in _processes_with(_SESSION_TOKEN, token) if _SERVER.search(command)]


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_behind(tmp_path_factory):
    """Every process the suite starts gets the session's own temporary folder (TMPDIR, which Ray,
    multiprocessing and tempfile honour), removed at the end, as pytest's tmp_path folders are kept in
    its own; the session fails (an error at its end) when the tests left a server running, or when a
    file it wrote holds one of the SECRETS (in the tests' folders, the session's temp folder, Ray's logs
    there, MLflow's stores, the jobs' logs). Writes into the machine's temp folder past TMPDIR are
    checked once for the whole run (`pytest_sessionfinish`), as a run with pytest-xdist has one session
    per worker.
    Session fixtures stop in the reverse order they started and this one starts first, so the shared
    Ray head and the S3 server are down when it looks."""
    from pipeline.failures import log_dir

    basetemp = tmp_path_factory.getbasetemp()  # pytest's folders stay where pytest keeps them
    token, started = f"{os.getpid()}-{time.time()}", time.time()
    session_tmp = tempfile.mkdtemp(prefix="oneforce-tests-")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ.update({_SESSION_TOKEN: token, "TMPDIR": session_tmp, **SECRETS})
    tempfile.tempdir = session_tmp
    try:
        yield
    finally:
        os.environ.pop("TMPDIR") if saved[0] is None else os.environ.update(TMPDIR=saved[0])
        tempfile.tempdir = saved[1]
    deadline = time.time() + 60  # processes of a stopped Ray exit within seconds of their head
    while (servers := _our_servers(token)) and time.time() < deadline:
        time.sleep(1)
    leaks = _files_holding_secrets([basetemp, Path(session_tmp), log_dir()], started)
    shutil.rmtree(session_tmp, ignore_errors=True)
    problems = [f"server still running: {s}" for s in servers] + [f"a credential written into {path}" for path in leaks[:20]]
    if problems:
        pytest.fail("the tests left things behind:\n" + "\n".join(problems), pytrace=False)


def _shared_folders() -> dict[str, set[str]]:
    """The names in the machine's temp folder, /dev/shm and the checkout."""
    return {d: set(os.listdir(d)) for d in (tempfile.gettempdir(), *([str(_SHM)] if _SHM.is_dir() else []), str(_CHECKOUT))}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the process that spans the run: plain pytest, or xdist's controller
        session.config.stash[_SHARED_BEFORE] = _shared_folders()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every worker's session fixtures have stopped: what the run left in the machine's temp
    folder, /dev/shm or the checkout fails it."""
    if _SHARED_BEFORE not in session.config.stash:
        return
    before = session.config.stash[_SHARED_BEFORE]
    ours = lambda d, name: (_OURS_IN_CHECKOUT if d == str(_CHECKOUT) else _OURS_IN_TMP).fullmatch(name)  # noqa: E731
    new = [f"{d}/{name}" for d, names in _shared_folders().items() for name in sorted(names - before[d]) if ours(d, name)]
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write("\n")
        reporter.write_line("the tests left things behind:\n" + "\n".join(f"left behind: {path}" for path in new), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket `oneforce-test`; yields the
    environment that fsspec/s3fs/boto read, already exported into os.environ, with the node cache of
    downloaded weights (ONEFORCE_CACHE) in the session's temporary folder."""
    port = free_port()
    proc = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": SECRETS["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
        "ONEFORCE_CACHE": str(tmp_path_factory.mktemp("node_cache")),
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="oneforce-test")
            yield env
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real local Ray cluster for the whole session, started the way users start one: `ray start
    --head` on loopback, dashboard and job server included (2 CPUs). It starts after the S3 server, so
    its workers inherit the AWS_* environment that points at it. Token authentication is off: the
    cluster is throwaway and loopback-only. Yields (GCS address, dashboard URL).

    `--block` keeps `ray start` in the foreground, so stopping it stops this cluster's processes
    only (`ray stop` would stop every Ray on the machine)."""
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    # Its own temp dir: the address file a head writes there (ray_current_cluster) would otherwise
    # outlive it in /tmp/ray and send every later `ray.init()` on the machine to a dead cluster. A short
    # one, in the session's temporary folder: Ray's Unix sockets live under it, at most 107 bytes of path,
    # which pytest-xdist's per-worker folders overrun (not `ray`: that is the default of every other Ray
    # the tests start). Its logs are copied into pytest's folder at the end.
    temp = Path(tempfile.gettempdir()) / "head"
    kept = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", _CLUSTER_TAG: str(temp)}
    log = kept / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=_interruptible,
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # for this process's drivers and CLI calls
        try:
            wait_for_port(dashboard, head, lambda: f"ray start --head did not come up: {log.read_text()[-2000:]}", timeout=180)
            yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        finally:
            _stop(head)
            _kill_stragglers(str(temp))
            if (temp / "session_latest").exists():  # not when the head never came up: its error is the one to see
                shutil.copytree(temp / "session_latest" / "logs", kept / "logs", symlinks=True, dirs_exist_ok=True)


def _kill_stragglers(tag: str, grace: float = 20) -> None:
    """A Ray worker exits within seconds of its raylet, except one stuck in a call that never returns
    to notice (seen once in CI: a Train controller, still there a minute after its head stopped).
    Stopping a cluster stops all of it, as `ray stop --force` does: what is left of this one after
    `grace` is killed, and named on the terminal so that it stays visible."""
    deadline = time.time() + grace
    while (left := _processes_with(_CLUSTER_TAG, tag)) and time.time() < deadline:
        time.sleep(0.5)
    for proc, command in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
        # The real stderr: past pytest's capture, which at a session fixture's end shows nothing
        print(f"\nkilled a process of the session's Ray cluster left after its head stopped: pid {proc.pid} {command[:120]}",
              file=sys.__stderr__)


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so `ray start` in Python gets
    KeyboardInterrupt even when this session runs in the background (where SIGINT is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(head: subprocess.Popen) -> None:
    """Ctrl-C: `ray start --block` then kills its processes at once (about 2 s); SIGTERM makes it
    stop each one gracefully in turn (30-60 s on 2 cores), the fallback if Ctrl-C did not end it."""
    head.send_signal(signal.SIGINT)
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        head.terminate()
        head.wait(timeout=90)


def wait_for_port(port: int, proc: subprocess.Popen, failure: Callable[[], str], timeout: float) -> None:
    """Return once something listens on 127.0.0.1:`port`; raise `failure()` if `proc` exits first or
    `timeout` seconds pass."""
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(failure())
        time.sleep(0.2)


def start_moto(port: int, **env: str) -> subprocess.Popen:
    """A moto S3 server on 127.0.0.1:`port` with this process's environment plus `env`, listening when
    this returns. The caller stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    wait_for_port(port, proc, lambda: f"moto.server on port {port} did not come up (exit code {proc.poll()})", timeout=30)
    return proc


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    """This process as a driver of the session's Ray cluster, shared by every test that needs Ray."""
    import ray

    ray.init(address=ray_cluster[0], log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


# The files that take longest (seconds of one serial run on a 2-core AVX2 machine, bench/RESULTS.md,
# session 15), longest first; every other file takes under 30 s.
SLOWEST_FILES = ["test_true_width.py", "test_quickstart.py", "test_critic_actors.py", "test_distill_jobs.py",
                 "test_failures.py", "test_generate.py", "test_preprocess.py", "test_serve.py", "test_distill.py"]


def pytest_collection_modifyitems(session, config, items):
    """The slowest files first, longest first, the rest in their order. With pytest-xdist (`-n 2 --dist
    loadfile --no-loadscope-reorder`, the README's command) each worker takes whole files in this order,
    so the two end within a few tests of each other instead of one running the longest file alone at the
    end. The true-width tier goes first in a serial run as well: it touches ~12 GB of memory its
    processes have never used, and on the 2-core CI-like virtual machine that costs 0.35-2.8 s of
    kernel time per GB depending on how much the host has taken back (`python bench/page_faults.py`);
    run last it took 180-191 s (four runs), first 149-155 s (three; bench/RESULTS.md, session 13)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
