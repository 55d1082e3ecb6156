"""What users run: `ray job submit --working-dir . -- python jobs/generate.py ...` against a real Ray
head started with `ray start --head` on loopback (dashboard and job server included)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.video import read_video
from tests.conftest import _free_port
from tests.test_generation import save_toy_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dashboard = _free_port(), _free_port()
    # A throwaway loopback cluster: no token authentication, so the CLI needs no token file.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run(
        ["ray", "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_generate_through_ray_job_submit(ray_head, tmp_path):
    checkpoint = save_toy_checkpoint(tmp_path / "student")
    (tmp_path / "prompts.txt").write_text("a red square moving left, fast\n\na blue circle moving up, slow\n")
    out = tmp_path / "videos"
    overrides = ["model.student_arch=toy-debug", "model.num_latent_frames=4", "model.latent_height=8", "model.latent_width=8",
                 "method.gradient_num_blocks=1", "method.shift=3.0", "tracking.tracking_uri=none"]
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
               "python", "jobs/generate.py", "--checkpoint", str(checkpoint), "--prompts", str(tmp_path / "prompts.txt"),
               "--out", str(out), *overrides]
    deadline = time.time() + 90
    while True:  # the head's job agent registers a few seconds after `ray start` returns
        result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=REPO,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
            break
        time.sleep(3)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in log, log[-3000:]
    assert "skipped bad lines: 1" in log and "generated: 2 clips" in log, log[-3000:]
    clips = sorted(out.glob("*.mp4"))
    assert len(clips) == 2 and all(read_video(c).shape == (4, 32, 32, 3) for c in clips)
