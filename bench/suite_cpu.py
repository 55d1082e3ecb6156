"""Where a command's CPU goes, by process role: runs the command while sampling every process's CPU time
twice a second from /proc, then prints CPU-seconds per role (Ray actors by class, Ray's daemons, job
scripts, pytest), with the memory each role's processes touched (the sum of their peak resident sizes),
and the machine's busy and idle time over the run, its kernel share and its page faults (from /proc/stat
and /proc/vmstat). The same suite has taken 2-3x longer on some machines of the same kind than on
others (bench/RESULTS.md); these figures show whether a slow run spent its time in the kernel (memory
faulted in again where the host takes freed memory back), lost it to the host, or did more work.

    python bench/suite_cpu.py -- python -m pytest -q -n 2 tests
    python bench/suite_cpu.py --json /tmp/cpu.json -- python jobs/quickstart.py --fast --out /tmp/qs

A process that lives less than half a second may be missed, and one's last half-second may be too; the
machine's total from /proc/stat has neither gap. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
# Checked in order against the command line; a Ray worker's is its title (`ray::CriticActor.update`).
ROLES = ("raylet", "gcs_server", "dashboard/agent", "dashboard.py", "log_monitor", "runtime_env", "monitor.py",
         "default_worker", "moto.server", "mlflow", "multiprocessing", "jobs/", "bench/", "pytest")


def role(command: str) -> str:
    if command.startswith("ray::"):
        return "ray::" + (re.split(r"[ .(:]", command[5:])[0] or "?")
    if "-u -c import sys;exec(eval(sys.stdin.readline()))" in command:
        return "pytest-xdist worker"
    for name in ROLES:
        if name in command:
            if name in ("jobs/", "bench/"):  # the script's name
                return name + command.split(name, 1)[1].split()[0]
            return name
    return command[:60] or "?"


def machine_cpu() -> dict[str, float]:
    """CPU-seconds of the whole machine since boot (busy, of which in the kernel, idle, and stolen: time
    the host ran something else while this machine had work), and its page faults (minor and major)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    vmstat = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {"busy": (user + nice + system + irq + softirq) / 100, "kernel": (system + irq + softirq) / 100,
            "idle": (idle + iowait) / 100, "stolen": steal / 100, "faults": float(vmstat.get("pgfault", 0))}


def peak_resident_gb(pid: str) -> float:
    """VmHWM: the most memory the process has had resident, i.e. pages it touched (0 once it has exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class Sampler(threading.Thread):
    """Every process's CPU time, counted from when it was first seen for processes older than the run."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.stopped, self.seen = interval, threading.Event(), {}

    def sample(self, first: bool) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rfind(")") + 2:].split()
                cpu = (int(fields[11]) + int(fields[12])) / TICK
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                peak = peak_resident_gb(pid)
            except (OSError, IndexError, ValueError):
                continue
            entry = self.seen.setdefault(f"{pid}:{fields[19]}", {"base": cpu if first else 0.0, "cpu": cpu, "command": "", "peak_gb": 0.0})
            entry["cpu"] = cpu
            entry["peak_gb"] = max(entry["peak_gb"], peak)
            if command:  # a process that has exited reads as empty: keep the name it had
                entry["command"] = command

    def run(self) -> None:
        self.sample(first=True)
        while not self.stopped.wait(self.interval):
            self.sample(first=False)


def by_role(seen: dict[str, dict]) -> list[tuple[str, float, int, float]]:
    """(role, CPU-s, processes, GB touched) for each role that used CPU during the run, most CPU first."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, 0.0])
    for entry in seen.values():
        used = entry["cpu"] - entry["base"]
        if used > 0:
            total = totals[role(entry["command"])]
            total[0] += used
            total[1] += 1
            total[2] += entry.get("peak_gb", 0.0)
    return sorted(((name, cpu, n, gb) for name, (cpu, n, gb) in totals.items()), key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every process's command and CPU here")
    parser.add_argument("--top", type=int, default=30, help="roles to print")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sampler = Sampler()
    before = machine_cpu()
    start = time.time()
    sampler.start()
    code = subprocess.call(command)
    sampler.stopped.set()
    sampler.join()
    wall = time.time() - start
    used = {key: value - before[key] for key, value in machine_cpu().items()}
    rows = by_role(sampler.seen)
    print(f"\nexit {code}; wall {wall:.0f} s; machine busy {used['busy']:.0f} CPU-s (kernel {used['kernel']:.0f}), "
          f"idle {used['idle']:.0f} CPU-s, stolen {used['stolen']:.0f} CPU-s, {used['faults'] / 1e6:.1f} M page faults; "
          f"sampled processes {sum(row[1] for row in rows):.0f} CPU-s, touched {sum(row[3] for row in rows):.0f} GB")
    for name, cpu, count, gb in rows[:args.top]:
        print(f"{cpu:8.1f} CPU-s {count:4d} processes {gb:6.1f} GB  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(list(sampler.seen.values())))
    sys.exit(code)


if __name__ == "__main__":
    main()
