"""The critic on its own actor group (`ray.critic_placement: actors`), and runs that lose a Train
worker or a critic actor: every case ends with the losses the plain single-process loop gives on the
rows the workers read."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from actors.critic import CriticGroup, route, senders
from pipeline import trainer
from tests.test_distill import assert_same_losses, batches_read, history_of, plain_history, tiny_config, tiny_data  # noqa: F401


@pytest.mark.parametrize("world,batch,actors", [(2, 1, 1), (2, 1, 2), (1, 4, 2), (2, 3, 3), (3, 2, 2)])
def test_route_gives_every_sample_of_the_global_batch_to_one_actor(world, batch, actors):
    share = world * batch // actors
    owner = {}
    for rank, pieces in enumerate(route(world, batch, actors)):
        assert sum(stop - start for _, start, stop in pieces) == batch
        for actor, start, stop in pieces:
            for row in range(start, stop):
                owner[rank * batch + row] = actor
    assert sorted(owner) == list(range(world * batch))
    assert all(owner[p] == p // share for p in owner)  # contiguous, equal shares
    for actor in range(actors):
        assert senders(world, batch, actors, actor) == sorted({p // batch for p in owner if owner[p] == actor})


def actors_config(dataset: str, storage: str, name: str, critic_actors: int, workers: int, *overrides: str):
    """`workers` Train workers with a global batch of 2 (tiny_config's plain-loop reference batch)."""
    return tiny_config(dataset, storage, name, f"ray.num_workers={workers}", f"train.batch_size={2 // workers}",
                       "ray.critic_placement=actors", f"ray.critic_actors={critic_actors}", "ray.critic_resources={CPU: 0.5}",
                       *overrides)


def fit_with_group(cfg, **kwargs):
    group = CriticGroup.start(cfg)
    try:
        return trainer.fit(cfg, "distill", critic=group, **kwargs), group
    finally:
        group.shutdown()


def test_one_critic_actor_serving_two_workers_equals_plain_loop(ray_local, tiny_data, tmp_path):
    cfg = actors_config(tiny_data, str(tmp_path), "one-critic", 1, 2)
    result, _ = fit_with_group(cfg)
    history = history_of(result)
    assert [h["step"] for h in history] == list(range(5)) and all(len(h["ids"]) == 2 for h in history)
    assert_same_losses(history, plain_history(cfg, batches_read(history, cfg.data.output)))
    checkpoint = Path(result.checkpoint.path)
    assert checkpoint.name == "checkpoint_00000005"
    assert any(p.name.startswith("mp_rank_00_model") for p in (checkpoint / "critic").iterdir())
    # A job that died while writing a later checkpoint leaves a directory Ray Train never registered:
    # it is not picked (a resume restores from Ray's own record; exports ask the same record).
    half = checkpoint.parent / trainer.checkpoint_name(9)
    (half / "critic").mkdir(parents=True)
    for file in checkpoint.iterdir():
        if file.is_file():  # state.json, the EMA, the architecture: each cut short
            (half / file.name).write_bytes(file.read_bytes()[:10])
    assert trainer.latest_checkpoint(cfg, "distill") == str(checkpoint)


def kill_after_checkpoints(cfg, kills: dict[int, Callable[[], int]], done: threading.Event, record: dict) -> threading.Thread:
    """A thread that waits for each checkpoint step in `kills` in turn (in step order, on the run's
    storage, local or s3), then calls its kill; `record[step]` is the killed pid, and whether the run
    had already finished by then."""
    import fsspec

    fs, run = fsspec.core.url_to_fs(trainer.run_dir(cfg, "distill"))

    def reached(step: int) -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{run}/{trainer.checkpoint_name(step)}/{trainer.STATE_FILE}")

    def watch() -> None:
        deadline = time.time() + 300
        for step, kill in sorted(kills.items()):
            while not reached(step):
                if done.is_set() or time.time() > deadline:
                    return
                time.sleep(0.2)
            record[step] = (kill(), reached(cfg.train.steps))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _alive_pid(class_name: str, address: str) -> int:
    from ray.util.state import list_actors

    deadline = time.time() + 60
    while time.time() < deadline:
        found = list_actors(address=address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
        if found:
            return found[0].pid
        time.sleep(0.2)
    raise AssertionError(f"no live {class_name}")


def test_killed_roles_on_s3_end_with_the_plain_loops_losses(ray_local, ray_cluster, tiny_data, s3_server, tmp_path):
    """One Train worker (batch 2) feeding two critic actors (one sample each) and one teacher actor,
    storage on the S3 server, checkpoints every 2 steps, two Train-run restarts allowed. Right after
    checkpoint 2 the Train worker's process is killed with SIGKILL, right after checkpoint 4 a critic
    actor's and the teacher's. A dead Train worker: Ray Train restarts the workers from that checkpoint
    on S3 and rank 0 re-forms the critic group from the same one (each actor reads its state back from
    S3). A dead teacher: Ray restarts it and retries its call. The history (steps 0-5, each once) has the
    losses the plain loop gives on the rows read. The roles leave a quarter of a CPU free, less than Ray
    Data's Parquet reader would wait for. (A relaunched job resuming from S3 is in
    tests/test_distill_jobs.py.)"""
    from ray.util.state import get_actor

    from actors.teacher import TeacherPool
    from pipeline import data

    storage = f"s3://oneforce-test/critic-{tmp_path.name}"
    cfg = actors_config(tiny_data, storage, "faults", 2, 1, "train.steps=6", "train.checkpoint_every=2", "train.max_failures=2",
                        "ray.teacher_actors=1", "ray.teacher_resources={CPU: 0.25}")
    group, teacher = CriticGroup.start(cfg), TeacherPool.start(cfg, data.read_negative_prompt(tiny_data))

    def killer(*class_names: str) -> Callable[[], list[int]]:
        def kill() -> list[int]:
            pids = [_alive_pid(name, ray_cluster[0]) for name in class_names]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return pids
        return kill

    done, record = threading.Event(), {}
    kills = {2: killer("RayTrainWorker"), 4: killer("CriticActor", "TeacherScoreActor")}
    watcher = kill_after_checkpoints(cfg, kills, done, record)
    try:
        result = trainer.fit(cfg, "distill", teacher, critic=group)
        restarts = get_actor(teacher.actors[0]._actor_id.hex(), address=ray_cluster[0]).num_restarts
    finally:
        done.set()
        watcher.join()
        group.shutdown()
        teacher.shutdown()
    assert set(record) == {2, 4} and not any(finished for _, finished in record.values()), record
    assert restarts >= 1
    assert result.checkpoint.path.startswith(storage.removeprefix("s3://"))  # on the S3 server
    history = history_of(result)
    assert [h["step"] for h in history] == list(range(6))
    assert_same_losses(history, plain_history(cfg, batches_read(history, cfg.data.output)))
