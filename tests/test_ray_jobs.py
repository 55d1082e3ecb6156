"""What users run: `ray job submit --working-dir . -- python jobs/generate.py ...` against the session's
real Ray cluster (`ray start --head` on loopback, tests/conftest.py), through the dashboard's job server."""

import subprocess
import sys
import time
from pathlib import Path

from pipeline.video import read_video
from tests.test_generation import save_toy_checkpoint

REPO = Path(__file__).resolve().parents[1]


def submit(dashboard: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", dashboard,
               "--working-dir", str(REPO), "--", *entrypoint]
    deadline = time.time() + 90
    while True:  # the head's job agent registers a few seconds after the dashboard answers
        result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=REPO)
        if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
            return result
        time.sleep(3)


def test_generate_through_ray_job_submit(ray_cluster, tmp_path):
    checkpoint = save_toy_checkpoint(tmp_path / "student")
    (tmp_path / "prompts.txt").write_text("a red square moving left, fast\n\na blue circle moving up, slow\n")
    out = tmp_path / "videos"
    overrides = ["model.student_arch=toy-debug", "model.num_latent_frames=4", "model.latent_height=8", "model.latent_width=8",
                 "method.gradient_num_blocks=1", "method.shift=3.0", "tracking.tracking_uri=none"]
    result = submit(ray_cluster[1], ["python", "jobs/generate.py", "--checkpoint", str(checkpoint),
                                     "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), *overrides])
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in log, log[-3000:]
    assert "skipped bad lines: 1" in log and "generated: 2 clips" in log, log[-3000:]
    clips = sorted(out.glob("*.mp4"))
    assert len(clips) == 2 and all(read_video(c).shape == (4, 32, 32, 3) for c in clips)
