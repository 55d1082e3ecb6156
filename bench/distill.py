"""Distillation step throughput and memory: Ray Train + DeepSpeed (ZeRO-2) + a teacher actor, one
worker, colocated on this machine, against the plain single-process loop doing the same math
(`pipeline.distill.plain_distill`: the same step functions, torch AdamW, an in-process teacher), with
the critic in the Train worker (placement `trainer`) and on a critic actor of its own (`actors`).

Both train the toy architecture (teacher, student and critic from the same random weights, as
configs/toy_distill.yaml's shapes: 9 latent frames of 8x8, one step per block) on the same synthetic
dataset for the same steps. Throughput is steps per second of wall time between the end of step
`--warmup` and the last step (Ray and DeepSpeed start-up excluded: paid once per run, not per step);
Rounds alternate (plain, each placement, plain, ...) and the ratio of medians is printed per placement.

Memory compares the plain process with the Train worker plus the actors (Ray's own processes,
the same for any job, are shown but not counted). Four measures, the first as the processes report it,
the others sampled from /proc every `--sample-every` seconds (peak over the samples of the group's sum):
    peak RSS   ru_maxrss of each process, summed: counts a page shared by both processes (libtorch's
               and the other libraries' code) twice
    PSS        each shared page split between the processes that map it, the driver and unrelated
               processes on the box included, so it undercounts by an amount that depends on the box
    USS        pages only this process maps (private); shared pages not counted at all
    distinct   the distinct physical pages resident in the group (from /proc/<pid>/pagemap; needs root
               to read frame numbers, else shown as n/a): the memory the group occupies
`--env KEY=VALUE` sets an environment variable in the plain process and every Ray process (ray.init's
runtime_env), e.g. glibc's MALLOC_ARENA_MAX=2.

    PYTHONPATH=. python bench/distill.py     # 2 rounds of 40 steps, batch 4, both placements
    PYTHONPATH=. python bench/distill.py --true-width --steps 16 --warmup 3 --batch 2

`--true-width`: teacher, student and critic at the Wan 1.3B's width (1536, 12 heads, ffn 8960) with 2
layers, from the same random weights, on a small grid (6 latent frames of 8x8, 16 text tokens of width
4096), in fp32: there the model's activations and states, not the per-process import floor (~0.3-0.5 GB
against the toy's 9 MB model), decide the memory ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from actors.roles import actor_roles
from pipeline import data, distill, trainer
from pipeline.distributed import peak_rss_mb
from pipeline.config import Config, load_config


# ----------------------------------------------------------------------------------------------------
# Memory of a group of processes
# ----------------------------------------------------------------------------------------------------

MEASURES = ("rss", "pss", "uss", "distinct")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rollup_mb(pid: int) -> dict[str, float] | None:
    """RSS, PSS and USS (Private_Clean + Private_Dirty) of a process, in MB; None once it has gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return None
    kib = {key.rstrip(":"): int(value) for key, value, *_ in (line.split() for line in lines)}
    return {"rss": kib["Rss"] / 1024, "pss": kib["Pss"] / 1024, "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024}


def resident_frames(pid: int) -> np.ndarray | None:
    """The physical frame numbers of a process's resident pages: none once it has gone (a process that
    exits between the group's lookup and this read holds no pages, as it adds nothing to the RSS sums),
    None when the kernel hides frame numbers (they read as 0 without CAP_SYS_ADMIN)."""
    frames = []
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            for line in maps:
                span, perms, *rest = line.split()
                if perms.startswith("---") or rest[-1] == "[vsyscall]":  # guard regions hold no pages
                    continue
                start, end = (int(address, 16) // PAGE for address in span.split("-"))
                pagemap.seek(start * 8)
                entries = np.frombuffer(pagemap.read((end - start) * 8), dtype=np.uint64)
                frames.append(entries[entries >> np.uint64(63) == 1] & np.uint64((1 << 55) - 1))
    except (OSError, ValueError):  # gone, or going: a pagemap cut short by the exit
        return np.zeros(0, np.uint64)
    frames = np.concatenate(frames) if frames else np.zeros(0, np.uint64)
    return None if len(frames) and not frames.any() else frames


class MemorySampler:
    """Samples groups of processes (`groups()`: name -> pids, looked up again at every sample) in a
    thread every `period` seconds, keeping the peak of each group's summed RSS, PSS, USS and, for the
    groups in `distinct`, distinct pages, in MB (`peaks[group][measure]`, None where not measured or
    where frame numbers are hidden)."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]], period: float, distinct: set[str]) -> None:
        self.groups, self.period, self.distinct = groups, period, distinct
        self.peaks: dict[str, dict[str, float | None]] = {}
        self.cpu_s = 0.0  # the sampler's own CPU time, which the timed steps share
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            started = time.thread_time()
            groups = self.groups()
            pids = {pid for name, group in groups.items() for pid in group}
            rollups = {pid: rollup_mb(pid) for pid in pids}
            frames = {pid: resident_frames(pid) for name, group in groups.items() if name in self.distinct for pid in group}
            for name, group in groups.items():
                self._sample(name, [rollups[pid] for pid in group if rollups[pid] is not None],
                             [frames[pid] for pid in group] if name in self.distinct else [None])
            self.cpu_s += time.thread_time() - started

    def _sample(self, name: str, rollups: list[dict[str, float]], frames: list[np.ndarray | None]) -> None:
        if not rollups:
            return
        sample: dict[str, float | None] = {m: sum(r[m] for r in rollups) for m in ("rss", "pss", "uss")}
        sample["distinct"] = None if any(f is None for f in frames) else len(np.unique(np.concatenate(frames))) * PAGE / 2**20
        peak = self.peaks.setdefault(name, sample)
        for m, value in sample.items():
            peak[m] = None if value is None or peak[m] is None else max(peak[m], value)


def ray_groups() -> dict[str, list[int]]:
    """This driver's Ray processes by role: the Train worker, the teacher actor, the critic actor (with
    placement `actors`), and Ray's own (raylet, GCS, the Train controller, Ray Data's and Train's helper
    actors, idle workers)."""
    groups: dict[str, list[int]] = {"worker": [], "teacher": [], "critic": [], "ray": []}
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::RayTrainWorker"):
            groups["worker"].append(process.pid)
        elif title.startswith("ray::TeacherScoreActor"):
            groups["teacher"].append(process.pid)
        elif title.startswith("ray::CriticActor"):
            groups["critic"].append(process.pid)
        elif title.startswith("ray::") or "/ray/" in title:  # not multiprocessing's resource tracker
            groups["ray"].append(process.pid)
    groups["worker + actors"] = groups["worker"] + groups["teacher"] + groups["critic"]
    return groups


# (text tokens, text width, latent channels, latent frames, latent side) of the toy and the true-width runs
SHAPES = {False: (16, 32, 48, 9, 8), True: (16, 4096, 16, 6, 8)}
TRUE_WIDTH_LAYERS = 2


def write_dataset(out: str, rows: int, true_width: bool) -> None:
    tokens, width, channels, frames, side = SHAPES[true_width]
    g = torch.Generator().manual_seed(0)
    info = data.DatasetInfo(
        config_hash="bench", teacher_id="random:bench:0", text_embedding=data.TensorSpec((tokens, width), "float32"),
        latent=data.TensorSpec((channels, frames, side, side), "float32"), trajectory_timesteps=(), negative_prompt="",
    )
    data.write_info(out, info)
    data.write_negative_prompt(out, "", torch.zeros(tokens, width))
    data.write_shard(out, info, {
        "id": [f"{i:016x}" for i in range(rows)], "prompt": [f"p{i}" for i in range(rows)], "seed": list(range(rows)),
        "kind": ["teacher"] * rows, "text_embedding": torch.randn(rows, tokens, width, generator=g),
        "latent": torch.randn(rows, channels, frames, side, side, generator=g),
    })


def write_true_width_model(out: str) -> str:
    """A random-init Wan 1.3B-width DiT of TRUE_WIDTH_LAYERS layers, as a diffusers folder."""
    from pipeline.capacity import measurement_model

    measurement_model(TRUE_WIDTH_LAYERS, torch.float32, checkpointing=False).save_pretrained(out)
    return out


def bench_config(dataset: str, storage: str, name: str, args: argparse.Namespace, placement: str = "trainer",
                 model: str = "") -> Config:
    if model:  # the true-width DiT for all three roles
        _, _, _, frames, side = SHAPES[True]
        roles = [f"model.{role}_{key}={model if key == 'path' else 'wan2.1-t2v-1.3b'}"
                 for role in ("teacher", "student", "critic") for key in ("path", "arch")]
        roles += [f"model.num_latent_frames={frames}", f"model.latent_height={side}", f"model.latent_width={side}",
                  "method.gradient_num_blocks=4", "method.discriminator.feature_layers=[0, 1]", "model.codec=''"]
    else:
        roles = ["model.teacher_path=''", "model.student_path=''", "model.codec=patch:4"]
    return load_config("configs/toy_distill.yaml", [
        f"ray.critic_placement={placement}", "ray.critic_actors=1", "ray.critic_resources={CPU: 0.5}",
        f"name={name}", f"data.output={dataset}", f"train.storage_path={storage}", "tracking.tracking_uri=none",
        "model.text_encoder_path=''", *roles,
        f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.batch_size={args.batch}",
        "ray.resources_per_worker={CPU: 0.5}", "ray.teacher_resources={CPU: 0.5}",
    ])


def steps_per_second(times: list[float], warmup: int) -> float:
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def plain_round(cfg: Config, warmup: int, threads: int, queue) -> None:
    """In a child process, so its peak RSS is its own."""
    torch.set_num_threads(threads)
    ctx = distill.plain_context(cfg, data.read_negative_prompt(cfg.data.output))
    batches = distill.epoch_batches(data.read_dataset(cfg.data.output), cfg.train.batch_size)
    times = []
    for step in range(cfg.train.steps):
        rows = next(batches)
        distill.distill_step(ctx, distill.rows_to_batch(rows, distill.global_indices(step, 0, 1, cfg.train.batch_size)), step)
        times.append(time.time())
    queue.put((steps_per_second(times, warmup), peak_rss_mb()))


@dataclass
class Round:
    steps_per_s: float
    peak_rss: dict[str, float]  # process -> its own ru_maxrss, MB
    sampled: dict[str, dict[str, float | None]]  # group -> measure -> peak over the samples, MB
    sampler_cpu_s: float


def run_plain(cfg: Config, args: argparse.Namespace) -> Round:
    queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=plain_round, args=(cfg, args.warmup, args.threads, queue))
    child.start()
    with MemorySampler(lambda: {"plain": [child.pid]}, args.sample_every, {"plain"}) as sampler:
        speed, rss = queue.get()
    child.join()
    return Round(speed, {"plain": rss}, sampler.peaks, sampler.cpu_s)


def run_ray(cfg: Config, args: argparse.Namespace) -> Round:
    """One distributed run: the Train worker, the teacher actor and, with placement `actors`, the
    critic actor, started as jobs/distill.py starts them."""
    import ray

    measured = {"worker", "teacher", "critic", "worker + actors"}
    with MemorySampler(ray_groups, args.sample_every, measured) as sampler:
        with actor_roles(cfg, "distill") as (teacher, critic):
            result = trainer.fit(cfg, "distill", teacher, critic=critic)
            rss = {"teacher": ray.get(teacher.actors[0].peak_rss_mb.remote())}
            if critic is not None:
                rss["critic"] = ray.get(critic.actors[0].peak_rss_mb.remote())
    with result.checkpoint.as_directory() as directory:
        history = json.loads((Path(directory) / trainer.STATE_FILE).read_text())["history"]
    speed = steps_per_second([h["time"] for h in history], args.warmup)
    return Round(speed, {"worker": history[-1]["peak_rss_mb"], **rss}, sampler.peaks, sampler.cpu_s)


ROWS = {"plain": "plain loop", "worker + actors": "worker + actors", "worker": "  Train worker",
        "teacher": "  teacher actor", "critic": "  critic actor", "ray": "Ray's own processes (not counted)"}


def print_round(index: int, placement: str, plain: Round, dist: Round) -> None:
    print(f"round {index}, critic placement {placement}: plain {plain.steps_per_s:.2f} steps/s, "
          f"{plain.peak_rss['plain']:.0f} MB; Ray Train + DeepSpeed + actors {dist.steps_per_s:.2f} steps/s, "
          f"{sum(dist.peak_rss.values()):.0f} MB (" + ", ".join(f"{k} {v:.0f}" for k, v in dist.peak_rss.items()) + ")")
    print(f"  sampled peaks, MB {'':18} {'RSS':>6} {'PSS':>6} {'USS':>6} {'distinct':>8}")
    for group, label in ROWS.items():
        peaks = {**plain.sampled, **dist.sampled}.get(group)
        if peaks and (group != "critic" or placement == "actors"):
            cells = [f"{peaks[m]:{8 if m == 'distinct' else 6}.0f}" if peaks[m] is not None else "     n/a" for m in MEASURES]
            print(f"    {label:34} {' '.join(cells)}")


def ratio(distributed: list[float | None], plain: list[float | None]) -> str:
    if None in distributed or None in plain:
        return "n/a"
    return f"{statistics.median(distributed) / statistics.median(plain):.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop (the Train worker and the "
                        "teacher actor get Ray's one each)")
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--placements", default="trainer,actors", help="critic placements to run beside the plain loop "
                        "(trainer: in the Train worker; actors: a critic actor group of one)")
    parser.add_argument("--true-width", action="store_true", help="the Wan 1.3B's width, 2 layers, a small grid (see above)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the plain process and of every Ray process (repeatable)")
    args = parser.parse_args()
    import ray  # here, not at the top: the plain loop's process (which imports this module) needs no Ray

    env = dict(kv.split("=", 1) for kv in args.env)
    os.environ.update(env)  # the plain loop's spawned process inherits it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        write_dataset(f"{tmp}/data", rows=4 * args.batch, true_width=args.true_width)
        model = write_true_width_model(f"{tmp}/model") if args.true_width else ""
        placements = args.placements.split(",")
        plain: list[Round] = []
        distributed: dict[str, list[Round]] = {p: [] for p in placements}
        for round_ in range(args.rounds):  # plain, then each placement, round after round
            plain.append(run_plain(bench_config(f"{tmp}/data", f"{tmp}/runs", f"plain{round_}", args, model=model), args))
            for placement in placements:
                cfg = bench_config(f"{tmp}/data", f"{tmp}/runs", f"{placement}{round_}", args, placement, model)
                distributed[placement].append(run_ray(cfg, args))
                print_round(round_, placement, plain[-1], distributed[placement][-1])
    arch = f"Wan 1.3B width, {TRUE_WIDTH_LAYERS} layers, fp32" if args.true_width else "toy arch"
    print(f"{arch}, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), plain loop on {args.threads} "
          f"torch thread(s), median of {args.rounds} rounds" + (f", environment {' '.join(args.env)}" if env else ""))
    for placement, rounds in distributed.items():
        speed = statistics.median(d.steps_per_s for d in rounds) / statistics.median(p.steps_per_s for p in plain)
        memory = ratio([sum(d.peak_rss.values()) for d in rounds], [p.peak_rss["plain"] for p in plain])
        sampled = {m: ratio([d.sampled["worker + actors"][m] for d in rounds], [p.sampled["plain"][m] for p in plain])
                   for m in MEASURES}
        print(f"critic placement {placement}:")
        print(f"  steps/s distributed / plain: {speed:.2f}x (target >= 0.8)")
        target = 1.3 if args.true_width else 1.5
        print(f"  peak RSS distributed (worker + actors) / plain: {memory}")
        print(f"  sampled peaks distributed / plain: summed RSS {sampled['rss']}, summed PSS {sampled['pss']}, summed USS "
              f"{sampled['uss']}, distinct pages {sampled['distinct']} (target <= {target:g} on distinct pages)")
    print(f"memory sampler: {args.sample_every:g} s period, {sum(r.sampler_cpu_s for r in plain + [d for rounds in distributed.values() for d in rounds]):.1f} s CPU in all")


if __name__ == "__main__":
    main()
