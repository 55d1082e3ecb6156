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
    assert "## On a GPU: `python bench/gpu.py`" in result.stdout and "One distillation step" in result.stdout
