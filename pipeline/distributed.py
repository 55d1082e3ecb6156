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


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: the current CUDA device under NCCL (Ray
    Train's and the critic group's backend on GPUs), else the CPU (gloo, or a group made for both,
    `cpu:gloo,cuda:nccl`). NCCL refuses CPU tensors, gloo CUDA ones."""
    if in_process_group() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_meta(value: torch.Tensor) -> bool:
    """The meta device stands in for an accelerator in the CPU tests: shapes and devices, no values."""
    return value.device.type == "meta"


def scalar(value: torch.Tensor | float) -> float:
    """A metric's value on the host (one device sync); NaN for a meta tensor, which holds none."""
    if isinstance(value, torch.Tensor):
        return float("nan") if on_meta(value) else float(value.detach())
    return float(value)


def all_finite(*values: torch.Tensor) -> bool:
    """True when every value is finite on every rank: a non-finite loss skips the update everywhere.
    (Meta tensors hold no values to check: they pass.)"""
    local = all(on_meta(v) or bool(torch.isfinite(v).all()) for v in values)
    flag = torch.tensor([float(local)], device=collective_device())
    if in_process_group():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Every rank's metrics averaged (the keys are the same on every rank at a given step)."""
    if not in_process_group():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, values.cpu())}


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


def heap_bytes() -> int:
    """Bytes this process holds from malloc right now, every arena and mmapped chunk included (glibc's
    mallinfo2): what torch's CPU tensors occupy, unlike RSS, which keeps pages malloc has freed."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd
