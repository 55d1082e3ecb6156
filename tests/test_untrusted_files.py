"""Untrusted weight files: a .pt / .pth whose pickle carries code is refused, in one line naming it, by
every loader that reads pickles (training checkpoints and original Wan releases as DiT, in the
preflight and the load; Wan's T5; Wan's VAE; all through pipeline.storage.load_pickled_tensors, as is the
toy teacher's resume checkpoint), and by a job's preflight with exit code 2; the payload never runs
(it would have written a file, as a plain load shows)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a plain torch.load / pickle.load would call
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """(a crafted file, the file its payload would create)."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "crafted.pt"
    torch.save({"generator_ema": {"blocks.0.ffn.0.weight": Payload(marker)}}, path)
    return path, marker


def refused(call, path: Path) -> str:
    with pytest.raises(ValueError) as err:
        call()
    line = str(err.value)
    assert "\n" not in line and str(path) in line and "refused to load" in line and "GLOBAL posix.system" in line, line
    return line


def test_every_pickle_loader_refuses_code(crafted, tmp_path):
    from pipeline.models.codec import load_original_vae
    from pipeline.models.loading import check_weights_at
    from pipeline.models.text import load_wan_t5
    from pipeline.models.wan_weights import read_state_dict

    path, marker = crafted
    refused(lambda: read_state_dict(str(path)), path)
    refused(lambda: check_weights_at(str(path), "model.teacher_path", "toy-debug", "model.teacher_arch"), path)
    for release_name, load in (("models_t5_umt5-xxl-enc-bf16.pth", lambda f: load_wan_t5(f, torch.float32)),
                               ("Wan2.1_VAE.pth", load_original_vae)):
        release = tmp_path / release_name
        release.write_bytes(path.read_bytes())
        refused(lambda: load(release), release)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is what it claims: a plain load runs the payload
    assert marker.exists()


def test_a_job_given_a_crafted_teacher_says_one_line_and_exits_2(crafted):
    path, marker = crafted
    result = subprocess.run(
        [sys.executable, "jobs/distill.py", "--config", "configs/toy_distill.yaml", "--dry-run",
         f"model.teacher_path={path}", f"model.student_path={path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model.teacher_path={path}: refused to load: its pickle asks for more than tensors "
                      "(Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not marker.exists()
