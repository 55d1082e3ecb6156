"""Local paths and fsspec URLs (s3://...) behind one set of helpers, so every job takes either.

S3 calls are bounded (a short connect timeout, two attempts), so an unreachable endpoint fails in
seconds, and storage errors are named by URL and cause (`naming`, `storage_cause`): no credentials,
endpoint unreachable, bucket missing, access denied.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

# fsspec applies these to every S3FileSystem it builds (in this process and in every Ray worker that
# imports this module); settings a user put in fsspec's config win. botocore's defaults (60 s connect
# timeout, legacy retries) made an unreachable endpoint take most of a minute to report.
S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 3, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}}
for _key, _value in S3_DEFAULTS.items():
    fsspec.config.conf.setdefault("s3", {}).setdefault(_key, _value)


class StorageError(OSError):
    """A storage failure, named by the URL it concerns and its cause."""


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_url(path: str) -> bool:
    """Whether a path as written names remote storage (`s3://bucket/...`) rather than a local path:
    what is asked of a setting before any filesystem is opened (`is_local` asks it of an opened one)."""
    return "://" in path


def user_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` as the user would write it: with its protocol (s3://...) unless it is local."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _error_code(err: BaseException) -> str:
    """The S3 error code of a botocore ClientError, possibly behind s3fs's OSError translation."""
    for candidate in (err, err.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def storage_cause(err: BaseException) -> str | None:
    """What an object-store failure means for the user, or None when `err` is not one."""
    names = {c.__name__ for c in type(err).__mro__}
    code = _error_code(err)
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError"}:
        return f"endpoint unreachable ({getattr(err, 'kwargs', {}).get('endpoint_url') or err})"
    if code == "NoSuchBucket":
        return "bucket missing"
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden") or (
        isinstance(err, PermissionError) and code
    ):
        return f"access denied ({code}: check the keys and the bucket's permissions)"
    return None


@contextlib.contextmanager
def naming(url: str, what: str = "") -> Iterator[None]:
    """Turn an object-store failure inside the block into a StorageError naming `what` (a config key)
    and `url` and the cause, in one line."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        cause = storage_cause(err)
        if cause is None:
            raise
        raise StorageError(f"{what}={url}: {cause}" if what else f"{url}: {cause}") from err


def check_exists(url: str, what: str) -> None:
    """Fail fast, before Ray and MLflow start, when an input `what`=`url` is not there."""
    with naming(url, what):
        fs, path = fsspec.core.url_to_fs(url)
        if not is_local(fs):
            check_bucket(fs, path)
        if not fs.exists(path):
            raise FileNotFoundError(f"{what}={url}: no such file or directory")


def check_writable(url: str, what: str) -> None:
    """Fail fast when the output `what`=`url` cannot be written: a local folder whose nearest existing
    parent is not a writable directory, or a bucket that is missing or refuses us."""
    with naming(url, what):
        fs, path = fsspec.core.url_to_fs(url)
        if not is_local(fs):
            check_bucket(fs, path)
            return
        existing = Path(path).absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"{what}={url}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{what}={url}: {existing} is not writable")


def check_bucket(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """One request that fails for a missing bucket, refused keys or an unreachable endpoint."""
    call = getattr(fs, "call_s3", None)
    if call is not None:
        call("list_objects_v2", Bucket=path.split("/", 1)[0], MaxKeys=1)


class local_copy:
    """Context manager yielding a local path for `path` (a file or a directory): itself if it is local,
    else a temporary download removed on exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        fs, fs_path = fsspec.core.url_to_fs(self.path)
        if is_local(fs):
            return fs_path
        self._tmp = tempfile.TemporaryDirectory(prefix="oneforce-")
        target = os.path.join(self._tmp.name, Path(fs_path.rstrip("/")).name)
        try:
            with naming(self.path):
                fs.get(fs_path, target, recursive=fs.isdir(fs_path))
        except BaseException:
            self._tmp.cleanup()
            raise
        return target

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------------
# Weights from object storage: downloaded once per node, shared by every role and job on it
# ---------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where remote weights are kept on this node: $ONEFORCE_CACHE, else ~/.cache/oneforce/weights."""
    configured = os.environ.get("ONEFORCE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "oneforce" / "weights"


def _content_key(fs: fsspec.AbstractFileSystem, path: str, url: str) -> str:
    """A digest of the URL and of what is there now (every file's name, size and ETag, or modification
    time where the store has no ETag): a changed upload gets a new cache entry, an unchanged one the old."""
    import hashlib
    import json

    if fs.isdir(path):
        entries = fs.find(path, detail=True)
        root = path.rstrip("/") + "/"
        listing = sorted((name.removeprefix(root), info.get("size"), str(info.get("ETag") or info.get("mtime") or ""))
                         for name, info in entries.items())
    else:
        info = fs.info(path)
        listing = [("", info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""))]
    if not listing:
        raise FileNotFoundError(f"{url}: an empty directory")
    return hashlib.sha256(json.dumps([url, listing]).encode()).hexdigest()[:20]


def node_cache(url: str, what: str = "") -> str:
    """A local path holding `url` (a file or a directory): the path itself when local, else a copy in
    this node's cache (`cache_root()`), downloaded once per content and reused by every process on the
    node (a teacher actor, the Train workers and the encoder share one download). Concurrent callers wait
    for one download (a file lock); a download lands under a temporary name and is renamed into place
    whole, so an interrupted one is never taken for complete."""
    import fcntl
    import shutil

    fs, path = fsspec.core.url_to_fs(url)
    if is_local(fs):
        return path
    name = Path(path.rstrip("/")).name
    with naming(url, what):
        if not fs.exists(path):
            raise FileNotFoundError(f"{what}={url}: no such file or directory" if what else f"{url}: no such file or directory")
        key = _content_key(fs, path, url)
        entry = cache_root() / key
        if (entry / name).exists():
            return str(entry / name)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.parent / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if (entry / name).exists():  # another process finished it while we waited
                return str(entry / name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
            try:
                fs.get(path, str(tmp / name), recursive=fs.isdir(path))
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(entry / name)


def load_pickled_tensors(path: str | Path, name: str = "", mmap: bool = True):
    """`torch.load` of a .pt / .pth with `weights_only=True`: tensors and plain containers, never code. A
    file whose pickle asks for anything else (a crafted file runs its payload under a plain load) is
    refused in one line naming it (`name`: the URL it came from, when `path` is its cached copy)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's message opens with advice to retry with weights_only=False (exactly what not to do
        # with such a file); the line that names what the pickle asked for is the one worth showing.
        reason = next((line for line in lines if "global" in line.lower()), "")
        what = f" ({reason[:200]})" if reason else ""
        raise ValueError(f"{name or path}: refused to load: its pickle asks for more than tensors{what}") from None
