"""Atomic, resumable checkpoints.

Everything is written under a temporary name and renamed into place, so a run killed mid-write leaves
the previous checkpoint intact. `TrainState` (counters and RNG) is JSON-readable next to the weights.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    torch_rng: str = ""  # base64 of torch.get_rng_state()

    @classmethod
    def capture(cls, step: int) -> TrainState:
        return cls(step=step, torch_rng=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode())

    def restore_rng(self) -> None:
        if self.torch_rng:
            raw = np.frombuffer(base64.b64decode(self.torch_rng), dtype=np.uint8).copy()
            torch.set_rng_state(torch.from_numpy(raw))


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state_json(state: TrainState, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)


def load_state_json(path: str | Path) -> TrainState:
    return TrainState(**json.loads(Path(path).read_text()))


def replace_directory(build: Any, target: str | Path) -> None:
    """Call `build(tmp_dir)` to fill a fresh temporary directory, then swap it in for `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
