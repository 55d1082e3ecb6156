"""Teacher actors.

- `TeacherSamplerStage`: the Ray Data `map_batches` callable that runs the frozen teacher's multi-step
  CFG ODE for preprocessing: one actor per device, loading the teacher once.
- `TeacherPool`: the distillation's real score on a pool of actors (`ray.teacher_actors`, each with
  `ray.teacher_resources`), the `RealScore` the training loop calls. Calls return at once with a
  pending result, so a Train worker's critic work overlaps the teacher's; an actor that dies is
  restarted by Ray (`max_restarts`) and its call retried (`max_task_retries`), and a call that still
  fails moves to the next actor.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from actors.encoder import default_device
from pipeline.config import Config, ModelConfig, build
from pipeline.data import noise_seed, pack, unpack
from pipeline.distill import teacher_real_x0
from pipeline.distributed import current_rank, peak_rss_mb
from pipeline.flow import euler_sample, guided_velocity
from pipeline.models.loading import load_teacher


class TeacherSamplerStage:
    """Adds `latent` (B, C, F, H, W) and `trajectory` (B, K, C, F, H, W) to a batch with `id` and
    `text_embedding`: each row is sampled from noise seeded by its id alone, with classifier-free
    guidance against the negative prompt, along `timesteps`, keeping the states at `keep_at`."""

    def __init__(
        self,
        model: dict[str, Any],
        latent_shape: tuple[int, int, int, int],
        timesteps: list[float],
        keep_at: list[float],
        guidance: float,
        negative_embedding: np.ndarray,
        text_dtype: str,
    ) -> None:
        self.device = default_device()
        self.teacher = load_teacher(build(ModelConfig, model), self.device)
        self.latent_shape, self.timesteps, self.keep_at, self.guidance = tuple(latent_shape), timesteps, keep_at, guidance
        self.text_dtype = text_dtype
        self.negative = unpack(negative_embedding, text_dtype).to(self.device)[None]

    @torch.no_grad()
    def sample(self, row_id: str, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, trajectory (K, ...)) of one row."""
        noise = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(noise_seed(row_id)))
        cond = text.to(self.device, self.negative.dtype)[None]
        # The teacher casts its inputs to its compute dtype; the guidance and the Euler steps run in fp32.
        velocity = guided_velocity(lambda x, t, c: self.teacher(x, t, c).sample.float(), cond, self.negative, self.guidance)
        latent, kept = euler_sample(velocity, noise[None].to(self.device), self.timesteps, self.keep_at)
        trajectory = torch.stack([kept[float(t)][0] for t in self.keep_at]) if self.keep_at else torch.zeros(0, *self.latent_shape)
        return latent[0].cpu(), trajectory.cpu()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = unpack(batch["text_embedding"], self.text_dtype)
        latents, trajectories = zip(*(self.sample(str(i), t) for i, t in zip(batch["id"], texts)))
        return {**batch, "latent": pack(torch.stack(latents)), "trajectory": pack(torch.stack(trajectories))}


log = logging.getLogger(__name__)


class TeacherScoreActor:
    """Holds the frozen teacher (the run's `model.dtype`, on its device) and serves the CFG real score."""

    def __init__(self, model: dict[str, Any], negative: torch.Tensor, guidance: float) -> None:
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            log.warning("teacher actor restarted after a failure; reloading the teacher")
        self.device = default_device()
        self.teacher = load_teacher(build(ModelConfig, model), self.device)
        self.negative, self.guidance = negative.to(self.device), guidance
        self.calls = 0

    def real_x0(self, x_t: np.ndarray, t: np.ndarray, text: np.ndarray) -> np.ndarray:
        """Arrays in and out: Ray hands large numpy arguments and results through its object store,
        read without a copy, where torch tensors would be pickled."""
        self.calls += 1
        return self.real_x0_on_device(*(torch.from_numpy(np.array(v)) for v in (x_t, t, text))).cpu().numpy()  # np.array: writable

    def real_x0_on_device(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The score on this actor's device, the inputs moved there (before the wire)."""
        return teacher_real_x0(self.teacher, self.negative, self.guidance, *(v.to(self.device) for v in (x_t, t, text)))

    def served(self) -> int:
        """Calls served since this actor (re)started."""
        return self.calls

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def ready(self) -> bool:
        return True


class PendingScore:
    """A real score in flight on one actor of the pool."""

    def __init__(self, pool: TeacherPool, args: tuple[np.ndarray, ...], actor: int, device: torch.device) -> None:
        self.pool, self.args, self.actor, self.device = pool, args, actor, device
        self.ref = pool.actors[actor].real_x0.remote(*args)

    def result(self) -> torch.Tensor:
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(len(self.pool.actors) + 1):
            try:
                return torch.from_numpy(np.array(ray.get(self.ref))).to(self.device)  # on the caller's device
            except RayActorError as err:
                if attempt == len(self.pool.actors):
                    raise
                self.pool.failures += 1
                self.actor = (self.actor + 1) % len(self.pool.actors)
                log.warning("teacher actor failed (%s); retrying the call on actor %d", type(err).__name__, self.actor)
                self.ref = self.pool.actors[self.actor].real_x0.remote(*self.args)
        raise AssertionError("unreachable")


class TeacherPool:
    """`RealScore` over teacher actors, round robin from an offset per Train rank. Picklable: it is
    handed to the Train workers inside their config."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self.failures = 0  # calls that had to move to another actor, in this process
        self._calls = 0
        self._lock = threading.Lock()

    @classmethod
    def start(cls, cfg: Config, negative: torch.Tensor, max_restarts: int = 3) -> TeacherPool:
        """Start `ray.teacher_actors` actors and wait until each has loaded the teacher."""
        import ray

        resources = dict(cfg.ray.teacher_resources)
        remote = ray.remote(TeacherScoreActor).options(
            num_cpus=resources.pop("CPU", 1), num_gpus=resources.pop("GPU", 0), resources=resources,
            max_restarts=max_restarts, max_task_retries=max_restarts,
        )
        actors = [remote.remote(cfg.to_dict()["model"], negative, cfg.method.real_guidance) for _ in range(cfg.ray.teacher_actors)]
        ray.get([a.ready.remote() for a in actors])
        return cls(actors)

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> PendingScore:
        with self._lock:
            index = (self._calls + current_rank()) % len(self.actors)
            self._calls += 1
        arrays = tuple(v.detach().float().cpu().numpy() for v in (x_t, t, text))
        return PendingScore(self, arrays, index, x_t.device)

    def __getstate__(self) -> dict[str, Any]:
        return {"actors": self.actors}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["actors"])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

