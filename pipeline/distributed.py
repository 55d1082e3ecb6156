"""Facts about this process and its process group, and the few collectives the roles share.

The Ray Train workers, the critic actor group and the teacher pool's callers use these; none of them
knows which role it serves, so both `pipeline/` and `actors/` import them from here (and not from the
trainer, which assembles the roles).
"""

from __future__ import annotations

import resource
from typing import Any

import torch
import torch.distributed as dist


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_rank() -> int:
    """This process's rank in its default process group (0 outside one): the Train rank in a worker."""
    return dist.get_rank() if in_process_group() else 0


def all_finite(*values: torch.Tensor) -> bool:
    """True when every value is finite on every rank: a non-finite loss skips the update everywhere."""
    flag = torch.tensor([float(all(bool(torch.isfinite(v).all()) for v in values))])
    if in_process_group():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Every rank's metrics averaged (the keys are the same on every rank at a given step)."""
    if not in_process_group():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, values)}


def gather_ids(ids: list[str]) -> list[list[str]]:
    """Every rank's list of row ids, in rank order."""
    if not in_process_group():
        return [ids]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ids)
    return everyone


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
