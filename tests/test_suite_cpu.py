"""bench/suite_cpu.py: a command's CPU by process role, from /proc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from suite_cpu import role  # noqa: E402


def test_roles_name_ray_actors_by_class_and_scripts_by_name():
    assert role("ray::CriticActor.update") == "ray::CriticActor"
    assert role("ray::IDLE") == "ray::IDLE"
    assert role("python jobs/distill.py --config /tmp/pytest-of-root/x.yaml") == "jobs/distill.py"
    assert role("/usr/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))") == "pytest-xdist worker"
    assert role("/opt/ray/core/src/ray/raylet/raylet --node-ip=127.0.0.1") == "raylet"


def test_a_busy_child_is_counted_under_its_own_command(tmp_path):
    """A child that writes 200 MB and burns 1 s of CPU, then idles past the next sample (the sampler
    reads every 0.5 s): its sampled time is that second, the memory it touched is those 200 MB and the
    interpreter, and the exit code is the command's."""
    burn = ("import time; held = b'x' * (200 << 20); end = time.process_time() + 1.0\n"
            "while time.process_time() < end: pass\ntime.sleep(1.2)\nraise SystemExit(3)")
    out = tmp_path / "cpu.json"
    result = subprocess.run([sys.executable, "bench/suite_cpu.py", "--json", str(out), "--", sys.executable, "-c", burn],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "exit 3;" in result.stdout and "machine busy" in result.stdout
    child = [e for e in json.loads(out.read_text()) if "process_time" in e["command"]]
    assert len(child) == 1 and 0.95 <= child[0]["cpu"] - child[0]["base"] <= 1.6, child
    assert 0.19 <= child[0]["peak_gb"] <= 0.25, child
    assert "kernel" in result.stdout and "page faults" in result.stdout
