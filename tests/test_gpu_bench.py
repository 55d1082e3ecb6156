"""bench/gpu.py, the script a lent GPU runs, on the CPU at toy size: every section runs and is written,
so the GPU's few minutes are not spent finding a bug in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_at_toy_size_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("gpu-*-tiny.json")
    report = json.loads(written.read_text())
    assert set(report["generation"]) == {"unfused", "unfused + VAE", "fused", "fused + VAE"}
    assert all(r["first_block_ms"] > 0 and r["ms_per_latent_frame"] > 0 for r in report["generation"].values())
    step = report["distillation"]
    assert step["s_per_step"] > 0 and step["predicted_gb"] > 0
    assert set(step["by_role"]) == {"student", "teacher", "critic"}  # beside the planner's roles on GPUs of their own
    assert all(r["predicted_resident_gb"] >= 0 and r["predicted_turn_gb"] >= 0 for r in step["by_role"].values())
    assert "## On a GPU: `python bench/gpu.py`" in result.stdout and "One distillation step" in result.stdout
    assert "The same step by role" in result.stdout


class ScriptedMemory:
    """An allocator the test drives (bench/gpu.py's DeviceMemory reads CUDA's): bytes allocated, and the
    peak since the last reset."""

    def __init__(self) -> None:
        self.now = self.high = 0

    def allocated(self) -> int:
        return self.now

    def peak(self) -> int:
        return self.high

    def reset_peak(self) -> None:
        self.high = self.now

    def take(self, n: int) -> None:
        self.now += n
        self.high = max(self.high, self.now)


def test_each_role_s_turn_is_its_own_peak_above_where_its_part_began():
    """A step in the student's part (base: 100 resident) that holds 10, calls the teacher (which peaks 5
    above its start and frees it), holds 3 more, then calls the critic twice (peaks 7, then 2): the
    student's turn is 13, not the 15 alive during the teacher's call; the teacher's 5; the critic's 7;
    the device's own peak 120 (the critic's 7 on top of the student's 113)."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu import TurnsByRole

    memory = ScriptedMemory()
    memory.take(100)
    turns = TurnsByRole(memory)

    class Role:
        def __init__(self, peaks: list[int]) -> None:
            self.peaks = peaks

        def call(self) -> None:
            n = self.peaks.pop(0)
            memory.take(n)
            memory.take(-n)

    teacher, critic = turns.wrap(Role([5]), "teacher", "call"), turns.wrap(Role([7, 2]), "critic", "call")
    with turns.part("student", base=memory.allocated()):
        memory.take(10)
        teacher.call()
        memory.take(3)
        critic.call()
        critic.call()
        memory.take(-13)
    assert dict(turns.turns) == {"student": 13, "teacher": 5, "critic": 7} and turns.highest == 120
    assert teacher.peaks == [] and critic.peaks == []  # other attributes reach the wrapped object
