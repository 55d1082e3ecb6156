"""Where a distillation's roles are assembled: the actor-hosted roles started for `trainer.fit`.

The trainer sees the teacher and the critic only through `pipeline.distill`'s Protocols; this is the
one place that picks their Ray implementations (`TeacherPool`, `CriticGroup`) from the config, so the
library never imports the actors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from actors.critic import CriticGroup
from actors.teacher import TeacherPool
from pipeline import data
from pipeline.config import Config


@contextlib.contextmanager
def actor_roles(cfg: Config, mode: Literal["ode_init", "distill"]) -> Iterator[tuple[TeacherPool | None, CriticGroup | None]]:
    """(teacher, critic) for `trainer.fit`/`launch`: the teacher actor pool (`ray.teacher_actors` > 0)
    and the critic actor group (`ray.critic_placement: actors`) of a distillation, started here and
    stopped on exit; None where the role lives inside each Train worker (and always for ODE init)."""
    teacher = critic = None
    try:
        if mode == "distill" and cfg.ray.teacher_actors:
            teacher = TeacherPool.start(cfg, data.read_negative_prompt(cfg.data.output))
        if mode == "distill" and cfg.ray.critic_placement == "actors":
            critic = CriticGroup.start(cfg)
        yield teacher, critic
    finally:
        for role in (teacher, critic):
            if role is not None:
                role.shutdown()
