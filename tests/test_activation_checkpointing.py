"""`train.gradient_checkpointing` on every trained role gives the unchecked path's losses and gradients:
the student's generator step (its rollout, the teacher's and the critic's feedback), the critic's update
(trunk and GAN taps, R1/R2 included) and the ODE-init regression. Checkpointing changes what is kept
for backward, never what is computed."""

from __future__ import annotations

import pytest
import torch

from pipeline import data, distill
from pipeline.models.loading import load_critic, load_student, load_teacher
from tests.test_distill import TRAJECTORY, tiny_config, write_tiny_dataset

RTOL = 1e-5  # of each tensor's own scale


class RecordedGradients:
    """An `Optimised` that keeps the gradients of each step instead of applying them."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.grads: dict[str, torch.Tensor] = {}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}
        self.module.zero_grad(set_to_none=True)
        return 0.0


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("tiny_data"))
    write_tiny_dataset(out, rows=2)
    return data.read_dataset(out) | {"negative": data.read_negative_prompt(out), "output": out}


def _config(rows: dict, checkpointing: bool):
    return tiny_config(rows["output"], rows["output"], "ckpt", f"train.gradient_checkpointing={checkpointing}")


def _batch(rows: dict) -> distill.Batch:
    return distill.rows_to_batch({k: rows[k] for k in ("id", "text_embedding", "latent", "trajectory")}, [0, 1])


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        scale = float(grad.abs().max())
        assert float((got[name] - grad).abs().max()) <= RTOL * scale, name


def _checkpointed(module: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


def _generator_and_critic_grads(rows: dict, checkpointing: bool) -> tuple[dict, dict, dict]:
    cfg = _config(rows, checkpointing)
    torch.manual_seed(0)
    student, critic = load_student(cfg.model, checkpointing=checkpointing), load_critic(cfg)
    assert _checkpointed(student) == _checkpointed(critic.trunk) == _checkpointed(critic.heads) == checkpointing
    teacher = distill.LocalTeacher(load_teacher(cfg.model), rows["negative"], cfg.method.real_guidance)
    ctx = distill.StepContext(cfg, RecordedGradients(student), teacher,
                              distill.LocalCritic(RecordedGradients(critic), cfg.method))
    metrics = distill.generator_step(ctx, _batch(rows), 0)
    metrics |= distill.critic_step(ctx, _batch(rows), 0)
    return metrics, ctx.student.grads, ctx.critic.critic.grads


def test_checkpointed_generator_step_and_critic_update_equal_the_unchecked_ones(rows):
    plain_metrics, plain_student, plain_critic = _generator_and_critic_grads(rows, False)
    metrics, student, critic = _generator_and_critic_grads(rows, True)
    for key in ("dmd", "gan_g", "critic_flow", "gan_d", "r1", "r2"):
        assert abs(metrics[key] - plain_metrics[key]) <= RTOL * max(1.0, abs(plain_metrics[key])), key
    _same(student, plain_student)
    _same(critic, plain_critic)
    assert any(name.startswith("heads.taps") for name in critic)  # the GAN taps were trained through


def test_checkpointed_ode_init_equals_the_unchecked_one(rows):
    grads, losses = [], []
    for checkpointing in (False, True):
        cfg = _config(rows, checkpointing)
        torch.manual_seed(0)
        student = RecordedGradients(load_student(cfg.model, for_ode_init=True, checkpointing=checkpointing))
        losses.append(distill.ode_init_step(student, _batch(rows), 0, cfg, TRAJECTORY)["ode_loss"])
        grads.append(student.grads)
    assert abs(losses[1] - losses[0]) <= RTOL * losses[0]
    _same(grads[1], grads[0])
