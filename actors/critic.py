"""The critic on its own actor group (`ray.critic_placement: actors`).

`ray.critic_actors` actors, each with `ray.critic_resources`, train the critic as one data-parallel
DeepSpeed engine: the group has its own process group (its own rendezvous on actor 0, separate from the
Train workers'), as OpenRLHF gives each model role its own. The Train workers see it through
`CriticGroup`, the same `CriticRole` the in-process critic serves, so the training loop does not change.

Routing. The global batch of a step (Train rank r holds positions r*B .. r*B+B-1) is cut into
`critic_actors` equal, contiguous shares; each Train worker sends every actor the part of its batch
that falls in the actor's share, and an actor computes once it holds its whole share. So every critic
update sees the whole global batch exactly once, and with the losses being batch means, the group's
gradient (averaged over actors) equals the one the Train workers would compute among themselves. The
generator's feedback is routed the same way: the GAN gradient of a sample is scaled back to the
sample's own worker batch, as if that worker had computed it. Tensors travel as numpy arrays, which
Ray passes through its object store (zero-copy reads) rather than as pickled copies.

Faults. A critic call that fails (an actor died, or was restarted by Ray and is no longer in a group)
fails the Train step; Ray Train then restarts the workers from the last checkpoint (`train.max_failures`)
and rank 0 re-forms the group: every actor is restarted fresh (a survivor may be stuck in a collective
with the dead one), the process group is formed again, and the critic's DeepSpeed state is loaded from
the same checkpoint, so the student and the critic continue from one consistent step.

Checkpoints. The group writes its DeepSpeed shards under `<checkpoint>/critic/` in the checkpoint
directory the Train workers then report (Ray Train merges their files into it); an export never reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.config import Config, build
from pipeline.distill import CriticBatch, Feedback, FeedbackRequest
from pipeline.distributed import current_rank, mean_over_ranks, peak_rss_mb
from pipeline.storage import is_local

log = logging.getLogger(__name__)
TAG = "critic"  # the DeepSpeed tag, and the sub-directory of a checkpoint the group writes
Wire = dict[str, Any]  # a request or a result as numpy arrays (and ints)
Request = TypeVar("Request", FeedbackRequest, CriticBatch)


# ----------------------------------------------------------------------------------------------------
# Routing and the wire format
# ----------------------------------------------------------------------------------------------------


def route(world: int, batch_size: int, actors: int) -> list[list[tuple[int, int, int]]]:
    """For each Train rank, the pieces of its batch: (actor, start, stop) rows of the local batch."""
    share = world * batch_size // actors
    pieces = []
    for rank in range(world):
        first = rank * batch_size
        mine = []
        for actor in range(actors):
            start, stop = max(first, actor * share), min(first + batch_size, (actor + 1) * share)
            if start < stop:
                mine.append((actor, start - first, stop - first))
        pieces.append(mine)
    return pieces


def senders(world: int, batch_size: int, actors: int, actor: int) -> list[int]:
    """The Train ranks that send `actor` a piece each step, in the order of the global batch."""
    return [rank for rank, pieces in enumerate(route(world, batch_size, actors)) if any(a == actor for a, _, _ in pieces)]


def to_wire(request: FeedbackRequest | CriticBatch, start: int, stop: int) -> Wire:
    """Rows start..stop of a request, its tensors as fp32 numpy arrays."""
    return {
        f.name: value[start:stop].detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value
        for f in dataclasses.fields(request)
        for value in [getattr(request, f.name)]
    }


def from_wire(cls: type[Request], pieces: list[Wire], device: torch.device) -> Request:
    """The pieces, concatenated in order, as one request on `device`."""
    fields = {}
    for f in dataclasses.fields(cls):
        values = [piece[f.name] for piece in pieces]
        if isinstance(values[0], np.ndarray):
            fields[f.name] = torch.from_numpy(np.concatenate(values)).to(device)  # concatenate copies: writable
        else:
            fields[f.name] = values[0]
    return cls(**fields)


# ----------------------------------------------------------------------------------------------------
# The actor
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Round:
    """One step's pieces for one kind of call, and the result every sender waits on."""

    pieces: dict[int, Wire] = field(default_factory=dict)
    result: asyncio.Future | None = None


class CriticActor:
    """One rank of the critic group. An asyncio actor: each Train worker's call waits here until the
    step's share is complete, then one thread computes it (the event loop stays free to answer)."""

    def __init__(self, config: dict[str, Any], rank: int, group_size: int, world: int, worker_batch: int) -> None:
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            log.warning("critic actor %d restarted; it rejoins when the group is formed again", rank)
        self.cfg: Config = build(Config, config)
        self.rank, self.group_size, self.worker_batch = rank, group_size, worker_batch
        self.senders = senders(world, worker_batch, group_size, rank)
        self.share = world * worker_batch // group_size
        self.critic = None  # a LocalCritic over the group's DeepSpeed engine, once formed
        self.rounds: dict[tuple[str, int], _Round] = {}
        self.device = torch.device("cpu")

    # -- the group ------------------------------------------------------------------------------------

    def formed(self) -> bool:
        return self.critic is not None

    def rendezvous(self) -> tuple[str, int]:
        """This actor's address and a free port for the group's process group (asked of rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    async def form(self, host: str, port: int) -> None:
        await asyncio.to_thread(self._form, host, port)

    def _form(self, host: str, port: int) -> None:
        import datetime

        import torch.distributed as dist

        from actors.encoder import default_device
        from pipeline.distill import LocalCritic
        from pipeline.engines import DeepSpeedOptimised
        from pipeline.models.loading import load_critic

        self.device = torch.device(default_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # DeepSpeed reads the usual launcher variables; they describe this group, not the Train workers'.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.group_size), LOCAL_RANK="0",
                          MASTER_ADDR=host, MASTER_PORT=str(port))
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo", init_method=f"tcp://{host}:{port}",
            rank=self.rank, world_size=self.group_size, timeout=datetime.timedelta(minutes=10),
        )
        # DeepSpeed's batch bookkeeping: each actor's micro-batch is its share of the global batch.
        cfg = self.cfg
        engine = DeepSpeedOptimised(load_critic(cfg, self.device), cfg.train.critic_lr, cfg, self.group_size, micro_batch=self.share)
        self.critic = LocalCritic(engine, cfg.method)

    # -- serving the loop -------------------------------------------------------------------------------

    async def feedback(self, step: int, sender: int, piece: Wire) -> Wire:
        return await self._collect("feedback", step, sender, piece, self._feedback)

    async def update(self, step: int, sender: int, piece: Wire) -> dict[str, float]:
        return await self._collect("update", step, sender, piece, self._update)

    async def _collect(self, kind: str, step: int, sender: int, piece: Wire, compute) -> Any:
        if self.critic is None:
            raise RuntimeError(f"critic actor {self.rank} is not in a formed group (restarted after a failure?)")
        state = self.rounds.get((kind, step))
        if state is None:
            state = self.rounds[(kind, step)] = _Round(result=asyncio.get_running_loop().create_future())
        state.pieces[sender] = piece
        if len(state.pieces) == len(self.senders):
            del self.rounds[(kind, step)]
            try:
                state.result.set_result(await asyncio.to_thread(compute, [state.pieces[s] for s in self.senders]))
            except Exception as err:  # every sender of the step gets it
                state.result.set_exception(err)
        return (await state.result)[sender]

    def _feedback(self, pieces: list[Wire]) -> dict[int, Wire]:
        feedback, gradient = self.feedback_on_device(pieces)
        results, row = {}, 0
        for sender, piece in zip(self.senders, pieces):
            rows = slice(row, row + piece["x0"].shape[0])
            row = rows.stop
            results[sender] = {
                "x0_fake": feedback.x0_fake[rows].float().cpu().numpy(),
                "gan_gradient": gradient[rows].float().cpu().numpy(),
                "gan_losses": feedback.gan_losses[rows].float().cpu().numpy(),
            }
        return results

    def feedback_on_device(self, pieces: list[Wire]) -> tuple[Feedback, torch.Tensor]:
        """The critic's feedback and the GAN gradient on this actor's device (before the wire)."""
        feedback: Feedback = self.critic.feedback(from_wire(FeedbackRequest, pieces, self.device))
        # The gradient is of the mean over this actor's rows; each sample's weight must be its own
        # worker batch's 1 / B, as when the worker computes it itself.
        return feedback, feedback.gan_gradient * (feedback.gan_gradient.shape[0] / self.worker_batch)

    def _update(self, pieces: list[Wire]) -> dict[int, dict[str, float]]:

        metrics = mean_over_ranks(self.critic.update(from_wire(CriticBatch, pieces, self.device)))
        return {sender: metrics for sender in self.senders}

    # -- checkpoints ----------------------------------------------------------------------------------

    async def save(self, checkpoint: str) -> None:
        await asyncio.to_thread(self._save, checkpoint)

    def _save(self, checkpoint: str) -> None:
        """Every actor writes its part of `checkpoint`/critic (a collective). On a local or mounted
        storage path DeepSpeed writes there directly, as the Train workers do (a copy through a
        temporary folder cost ~10 s per true-width checkpoint); on s3:// to local disk, then uploaded."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(checkpoint)
        if is_local(fs):
            self.critic.critic.engine.save_checkpoint(root, tag=TAG, save_latest=False)
            return
        with tempfile.TemporaryDirectory(prefix="oneforce-critic-") as tmp:
            self.critic.critic.engine.save_checkpoint(tmp, tag=TAG, save_latest=False)
            fs.makedirs(f"{root}/{TAG}", exist_ok=True)
            for name in sorted(os.listdir(f"{tmp}/{TAG}")):
                fs.put_file(f"{tmp}/{TAG}/{name}", f"{root}/{TAG}/{name}")

    async def load(self, checkpoint: str) -> None:
        await asyncio.to_thread(self._load, checkpoint)

    def _load(self, checkpoint: str) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(checkpoint)
        if not fs.exists(f"{root}/{TAG}"):
            raise FileNotFoundError(f"checkpoint {checkpoint} has no critic group state ({TAG}/); was it written "
                                    "with ray.critic_placement: trainer?")
        with tempfile.TemporaryDirectory(prefix="oneforce-critic-") as tmp:
            os.makedirs(f"{tmp}/{TAG}")
            for path in fs.ls(f"{root}/{TAG}", detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("zero_pp_rank_") and not name.startswith(f"zero_pp_rank_{self.rank}_"):
                    continue  # another rank's optimiser partition
                fs.get_file(path, f"{tmp}/{TAG}/{name}")
            loaded, _ = self.critic.critic.engine.load_checkpoint(tmp, tag=TAG, load_lr_scheduler_states=False)
            if loaded is None:
                raise FileNotFoundError(f"checkpoint {checkpoint}: DeepSpeed found no critic state in {TAG}/")

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


# ----------------------------------------------------------------------------------------------------
# What the Train workers hold
# ----------------------------------------------------------------------------------------------------


class CriticGroup:
    """The `CriticRole` of a critic actor group, for the Train workers. Picklable: it travels to them
    inside their config, and every rank calls it with its own part of the step's batch."""

    def __init__(self, actors: list[Any], world: int, batch_size: int) -> None:
        self.actors = actors
        self.routes = route(world, batch_size, len(actors))

    @classmethod
    def start(cls, cfg: Config) -> CriticGroup:
        """Start `ray.critic_actors` actors (not yet formed: the Train workers' rank 0 forms the group,
        from the checkpoint it resumes from)."""
        import ray

        resources = dict(cfg.ray.critic_resources)
        world, batch, size = cfg.ray.num_workers, cfg.train.batch_size, cfg.ray.critic_actors
        # Restarts are bounded by the run's own failure budget (train.max_failures): every re-forming
        # restarts each actor once, so Ray may restart them without limit.
        remote = ray.remote(CriticActor).options(
            num_cpus=resources.pop("CPU", 1), num_gpus=resources.pop("GPU", 0), resources=resources, max_restarts=-1,
        )
        actors = [remote.remote(cfg.to_dict(), rank, size, world, batch) for rank in range(size)]
        ray.get([a.formed.remote() for a in actors])
        return cls(actors, world, batch)

    # -- the group's life (rank 0 of the Train workers) ----------------------------------------------

    def form(self, checkpoint: str | None = None, timeout: float = 600) -> None:
        """Form the process group and the engines; restart every actor first when any was formed
        before (a re-run after a failure); then load `checkpoint`'s critic state, if given."""
        import ray

        if any(self._states(timeout)):
            log.warning("re-forming the critic group: restarting its %d actors", len(self.actors))
            for actor in self.actors:
                ray.kill(actor, no_restart=False)
            deadline = time.time() + timeout
            while any(self._states(timeout)):  # calls land on the old processes until Ray replaced them
                if time.time() > deadline:
                    raise TimeoutError(f"the critic actors did not restart within {timeout:.0f} s")
                time.sleep(0.5)
        host, port = ray.get(self.actors[0].rendezvous.remote(), timeout=timeout)
        ray.get([a.form.remote(host, port) for a in self.actors], timeout=timeout)
        if checkpoint is not None:
            ray.get([a.load.remote(checkpoint) for a in self.actors])

    def _states(self, timeout: float) -> list[bool]:
        """Whether each actor is formed; an actor being restarted counts as formed until it answers."""
        import ray
        from ray.exceptions import RayActorError

        states = []
        for actor in self.actors:
            try:
                states.append(ray.get(actor.formed.remote(), timeout=timeout))
            except RayActorError:
                states.append(True)
        return states

    def start_save(self, checkpoint: str) -> Callable[[], None]:
        """Every actor starts writing its part of `checkpoint`/critic; returns the wait for all of them,
        so the Train workers write their own part meanwhile."""
        import ray

        pending = [a.save.remote(checkpoint) for a in self.actors]
        return lambda: ray.get(pending)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    # -- the CriticRole (every Train rank) ---------------------------------------------------------------

    def feedback(self, request: FeedbackRequest) -> Feedback:
        import ray

        parts = ray.get(self._send("feedback", request))
        device = request.x0.device
        joined = {key: torch.from_numpy(np.concatenate([p[key] for p in parts])).to(device) for key in parts[0]}
        return Feedback(x0_fake=joined["x0_fake"], gan_gradient=joined["gan_gradient"], gan_losses=joined["gan_losses"])

    def update(self, batch: CriticBatch) -> dict[str, float]:
        import ray

        return ray.get(self._send("update", batch))[0]  # the group's metrics, the same from every actor

    def _send(self, kind: str, request: FeedbackRequest | CriticBatch) -> list[Any]:
        rank = current_rank()
        return [
            getattr(self.actors[actor], kind).remote(request.step, rank, to_wire(request, start, stop))
            for actor, start, stop in self.routes[rank]
        ]

