"""DeepSpeed engines for the trainable roles (student, critic): one engine per model, its JSON config a
function of the typed config, and the `Optimised` interface the training steps use.

On CPU (tests, the toy world) engines run in float32 over gloo; on GPUs `model.dtype: bfloat16` turns on
DeepSpeed's bf16 mode (fp32 master weights and reductions). The optimiser is torch's AdamW as a client
optimiser, so the plain loop's `TorchOptimised` does the same math.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pipeline.config import Config


def deepspeed_config(cfg: Config, world_size: int, micro_batch: int | None = None) -> dict[str, Any]:
    """`micro_batch`: samples per rank and step (default `train.batch_size`; a critic actor's share)."""
    t = cfg.train
    micro_batch = micro_batch or t.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW as a client optimiser
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedOptimised:
    """A DeepSpeed engine behind `Optimised`: backward through the engine (ZeRO's reduce hooks), step
    with the engine's global-norm clipping."""

    def __init__(self, module: nn.Module, lr: float, cfg: Config, world_size: int, micro_batch: int | None = None) -> None:
        import deepspeed

        t = cfg.train
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg, world_size, micro_batch)
        )
        self.module = self.engine.module
        if cfg.model.dtype == "bfloat16":  # DeepSpeed's bf16 mode casts the whole module
            self.module.compute_dtype = torch.bfloat16
        self.zero_stage = t.zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def gathered(self) -> contextlib.AbstractContextManager:
        """Under ZeRO-3 the parameters are partitioned: this gathers them for reading (every rank must
        enter it); elsewhere it does nothing."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer at full size in fp32 on the CPU, for reading (the EMA, samples,
        exports). Under ZeRO-3 these are copies (the gathered parameters are released on return);
        otherwise fp32 CPU parameters come back as they are, without a copy of the whole model per
        generator step."""
        with self.gathered():
            state = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
            return {k: v.clone() for k, v in state.items()} if self.zero_stage == 3 else state
