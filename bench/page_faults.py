"""What touching memory costs on this machine, in kernel time: faulting in memory a process has never
touched, and faulting it in again when a large tensor is allocated and freed in a loop (as optimiser
temporaries and checkpoint buffers are). Each setting runs in a fresh interpreter.

    python bench/page_faults.py

Settings: glibc's defaults; glibc keeping freed memory (one arena, no mmap, no trimming), where a freed
tensor's pages are reused instead of returned; PyTorch's transparent huge pages for CPU tensors.
The suite's time (bench/RESULTS.md, session 13) is why: its big tests spend most of their CPU in the
kernel on some runs of this virtual machine, whose freed memory goes back to the host."""

from __future__ import annotations

import os
import subprocess
import sys

SETTINGS = {
    "glibc defaults": {},
    "glibc keeps freed memory": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
    "torch THP allocations": {"THP_MEM_ALLOC_ENABLE": "1"},
}

PROBE = r"""
import os, threading, time, torch
torch.set_num_threads(1)

def timed(body):
    t0, wall = os.times(), time.time()
    body()
    t1 = os.times()
    return f"{time.time() - wall:5.2f} s wall, {t1.user - t0.user:5.2f} user, {t1.system - t0.system:5.2f} sys"

def fresh():  # 6 GB, each page touched once
    keep = [torch.empty(512 * 2**20 // 4).fill_(1.0) for _ in range(12)]

def churn():  # 20 x 630 MB allocated, filled, freed
    for i in range(20):
        x = torch.empty((630 + i % 3) * 2**20 // 4); x.fill_(1.0); del x

out = {}
thread = threading.Thread(target=lambda: out.setdefault("t", timed(churn)))
thread.start(); thread.join()
print(f"fresh 6 GB: {timed(fresh)} | churn, main thread: {timed(churn)} | churn, other thread: {out['t']}")
"""


def main() -> None:
    for name, env in SETTINGS.items():
        result = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True)
        print(f"{name:26s} {result.stdout.strip()}")


if __name__ == "__main__":
    main()
