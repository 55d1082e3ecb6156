"""DeepSpeed engines on two real gloo ranks: the bf16 config reduces in fp32, each rank holds a share of
the fp32 master weights, and a state laid out like those shares (the EMA) gathers to the full weights
and scatters back exactly, leaving the optimiser's own masters as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.engines import deepspeed_config

CASES = [(0, "float32"), (1, "bfloat16"), (2, "bfloat16"), (3, "bfloat16")]


def _config(stage: int, dtype: str):
    return load_config(None, ["model.teacher_arch=tiny", f"train.zero_stage={stage}", f"model.dtype={dtype}"])


def _check_case(rank: int, stage: int, dtype: str) -> dict[str, bool]:
    from pipeline.engines import DeepSpeedOptimised
    from tests.conftest import tiny_wan

    bf16 = dtype == "bfloat16"
    initial = {k: v.clone() for k, v in tiny_wan(seed=0).state_dict().items()}
    engine = DeepSpeedOptimised(tiny_wan(seed=0), 1e-2, _config(stage, dtype), world_size=2)
    as_trained = {k: v.bfloat16().float() if bf16 else v for k, v in initial.items()}  # DeepSpeed casts first
    total = sum(v.numel() for v in initial.values())
    held = sum(m.numel() for m in engine.master_weights())
    before = engine.full_state()

    g = torch.Generator().manual_seed(7)  # the same on both ranks, like a state read from disk
    other = {k: torch.randn(v.shape, generator=g) for k, v in initial.items()}
    shares = engine.shares_of(other)
    round_trip = engine.full_state(shares)
    unchanged = engine.full_state()

    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    out = engine.module(x, torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g)).sample
    engine.backward(out.float().square().mean())
    engine.step()
    after = engine.full_state()
    module = {k: v.detach() for k, v in engine.module.state_dict().items()}
    return {
        "masters fp32": all(m.dtype == torch.float32 for m in engine.master_weights()),
        "a share, not a copy": held < total if stage else held == total,
        "gathers the initial weights": all(torch.equal(before[k], as_trained[k]) for k in initial),
        "an EMA-like state round-trips": all(torch.equal(round_trip[k], other[k]) for k in other),
        "shares are fp32 like the masters": [s.shape for s in shares] == [m.shape for m in engine.master_weights()],
        "the masters are left as they were": all(torch.equal(unchanged[k], before[k]) for k in before),
        "the step moved the masters": any(not torch.equal(after[k], before[k]) for k in before),
        "the module is the masters rounded": stage == 3 or all(
            torch.equal(module[k].float(), after[k].bfloat16().float() if bf16 else after[k]) for k in module),
        "fp32 gradient reduction": not bf16 or engine.engine.communication_data_type == torch.float32,
    }


def _engines_on_two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        results = {f"{stage}/{dtype}": _check_case(rank, stage, dtype) for stage, dtype in CASES}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_master_weights_shares_and_their_gather_on_two_ranks(tmp_path):
    """Spawned, reporting through files (a fork would inherit the session's Ray driver threads)."""
    import torch.multiprocessing as mp

    from tests.browser import free_port

    mp.spawn(_engines_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        failed = [f"{case}: {check}" for case, checks in results.items() for check, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"


def test_the_deepspeed_config_reduces_bf16_gradients_in_fp32_and_refuses_zero_0_in_bf16():
    config = deepspeed_config(_config(2, "bfloat16"), world_size=8)
    assert config["communication_data_type"] == "fp32" and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(_config(1, "bfloat16"), world_size=8)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "communication_data_type" not in deepspeed_config(_config(2, "float32"), world_size=2)
    with pytest.raises(ValueError, match="train.zero_stage=0 with model.dtype=bfloat16"):
        deepspeed_config(_config(0, "bfloat16"), world_size=8)
