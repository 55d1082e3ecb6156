"""Local paths and fsspec URLs (s3://...) behind one set of helpers, so every job takes either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def user_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` as the user would write it: with its protocol (s3://...) unless it is local."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


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
        fs.get(fs_path, target, recursive=fs.isdir(fs_path))
        return target

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
