"""DeepSpeed engines for the trainable roles (student, critic): one engine per model, its JSON config a
function of the typed config, and the `Optimised` interface the training steps use.

On CPU (tests, the toy world) engines run in float32 over gloo; on GPUs `model.dtype: bfloat16` turns on
DeepSpeed's bf16 mode. The config (`deepspeed_config`), and why:
- fp32 master weights and fp32 gradient reduction. bf16 mode keeps fp32 masters in the ZeRO optimiser;
  gradients are reduced across ranks in `communication_data_type`, which would otherwise default to
  bf16 (8 bits of mantissa summed over 8 ranks). ZeRO-1 also accumulates gradients in fp32
  (`grad_accum_dtype`, DeepSpeed's BF16 optimiser); ZeRO-2/3 keep bf16 gradients until the reduction.
- ZeRO-0 (plain data parallel) is refused in bf16: DeepSpeed would reduce and clip in bf16 and keep no
  master weights that it can gather (`safe_get_full_fp32_param`), which the EMA reads.
- `overlap_comm`: gradient buckets are reduced while backward goes on (ZeRO-2/3), and ZeRO-3 prefetches
  the next layers' parameters; `contiguous_gradients` avoids fragmenting memory with many bucket copies.
- Buckets of 2e8 elements (DeepSpeed's default is 5e8): an fp32 bucket is 800 MB instead of 2 GB, with
  two in flight under `overlap_comm`; a 1.4B-parameter model still reduces in ~7 buckets.
- torch's fused AdamW as the client optimiser (one kernel per step instead of a loop over tensors, on
  CUDA and CPU alike); the plain loop's `TorchOptimised` uses the same optimiser, so both do the same math.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pipeline.config import Config, TrainConfig

BUCKET_ELEMENTS = 200_000_000


def adamw(params: list[torch.nn.Parameter], lr: float, t: TrainConfig) -> torch.optim.AdamW:
    """Fused on CUDA and the CPU; elsewhere (the meta device of the placement tests) torch's default."""
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused or None)


def deepspeed_config(cfg: Config, world_size: int, micro_batch: int | None = None) -> dict[str, Any]:
    """`micro_batch`: samples per rank and step (default `train.batch_size`; a critic actor's share)."""
    t = cfg.train
    micro_batch = micro_batch or t.batch_size
    bf16 = cfg.model.dtype == "bfloat16"
    if bf16 and t.zero_stage == 0:
        raise ValueError("train.zero_stage=0 with model.dtype=bfloat16: DeepSpeed would reduce gradients in bf16 "
                         "and keep no fp32 master weights; use train.zero_stage=1 or more")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero |= {"contiguous_gradients": True, "reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS}
    if t.zero_stage >= 2:
        zero["overlap_comm"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW as a client optimiser
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["communication_data_type"] = "fp32"
        if t.zero_stage == 1:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


class DeepSpeedOptimised:
    """A DeepSpeed engine behind `Optimised`: backward through the engine (ZeRO's reduce hooks), step
    with the engine's global-norm clipping."""

    def __init__(self, module: nn.Module, lr: float, cfg: Config, world_size: int, micro_batch: int | None = None) -> None:
        import deepspeed

        t = cfg.train
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = adamw(params, lr, t)
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg, world_size, micro_batch)
        )
        self.module = self.engine.module
        if cfg.model.dtype == "bfloat16":  # DeepSpeed's bf16 mode casts the whole module
            self.module.compute_dtype = torch.bfloat16

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 tensors the optimiser updates, this rank's share: DeepSpeed's flat fp32 partitions
        under ZeRO (and in bf16 mode), the parameters themselves for fp32 without ZeRO."""
        for name in _MASTER_GROUPS:
            groups = getattr(self.engine.optimizer, name, None)
            if groups is not None:
                return list(groups)
        return [p for p in self.module.parameters() if p.requires_grad]

    def full_state(self, masters: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The full fp32 weights by name, on the CPU, copies: of the master weights, or of `masters` (laid
        out like them, e.g. an EMA) put in their place for the gather and taken out again. DeepSpeed's
        own gather (`safe_get_full_fp32_param`): a collective every rank enters under ZeRO."""
        if masters is None:
            return self._gather()
        with self._masters_replaced_by(masters):
            return self._gather()

    def shares_of(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """This rank's share of a full fp32 state, laid out like `master_weights()` (the inverse of
        `full_state`): DeepSpeed's `safe_set_full_fp32_param` writes it into the masters, which are then
        copied and put back."""
        from deepspeed.utils import safe_set_full_fp32_param

        with self._masters_replaced_by(None):
            for name, param in self.module.named_parameters():
                if not param.requires_grad:
                    continue
                if _is_zero_param(param):
                    safe_set_full_fp32_param(param, state[name].to(param.device, torch.float32))
                else:
                    param.data.copy_(state[name])
            return [m.detach().clone() for m in self.master_weights()]

    @contextlib.contextmanager
    def _masters_replaced_by(self, values: list[torch.Tensor] | None):
        """The master weights hold `values` (None: whatever the body writes) inside, their own after."""
        masters = self.master_weights()
        kept = [m.detach().clone() for m in masters]
        try:
            with torch.no_grad():
                for master, value in zip(masters, values or []):
                    master.copy_(value)
            yield
        finally:
            with torch.no_grad():
                for master, value in zip(masters, kept):
                    master.copy_(value)

    def _gather(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.module.named_parameters())
        state = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(params[name]) if name in params and _is_zero_param(params[name]) else None
            state[name] = (value.detach() if full is None else full).to("cpu", torch.float32, copy=True)
        return state


# Where DeepSpeed's optimisers keep this rank's fp32 master weights: ZeRO-1/2, ZeRO-3, and the bf16
# optimiser of ZeRO-1 with fp32 gradient accumulation.
_MASTER_GROUPS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def _is_zero_param(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed holds this parameter's fp32 master elsewhere (ZeRO-3's ds_id, ZeRO-1/2's and the
    bf16 optimiser's fragment mapping). The same answer on every rank: a rank that holds no fragment of
    the parameter has a mapping of None, and must still join its gather."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")
