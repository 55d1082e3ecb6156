"""One-Forcing's training steps (DESIGN §3), sequenced from `rollout` and `losses`, with every role
behind a small Protocol so that where a role lives (this process, a Ray actor) never shows here.

Roles:
    Optimised   a trainable module and its optimiser: `TorchOptimised` (the plain reference loop) or a
                DeepSpeed engine (`pipeline.engines.DeepSpeedOptimised`, the Ray Train workers)
    RealScore   the frozen teacher's CFG real score in x0 space, returned as a `Pending` so the call can
                be in flight (on a teacher actor) while the critic works
    CriticRole  the critic: `feedback` for the generator step, `update` for its own step

Randomness: every draw (rollout noise, score timesteps, their noise) comes from a generator seeded by
(run seed, step, global sample index, purpose), so a batch of 2 on one worker and two workers with a
batch of 1 draw the same numbers; exit steps are drawn per step, the same on every rank. Roles receive
their random inputs from here and draw nothing themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from pipeline import losses
from pipeline.config import Config, MethodConfig, TrainConfig
from pipeline.distributed import all_finite, scalar
from pipeline.engines import adamw
from pipeline.flow import add_noise, sample_timesteps, x0_from_velocity
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.discriminator import Critic
from pipeline.rollout import draw_exit_steps, rollout, training_steps

# ----------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------


def seeded(run_seed: int, step: int, index: int, purpose: str) -> torch.Generator:
    """A generator for one sample's draws of one kind at one step (index -1: shared by the whole step)."""
    digest = hashlib.sha256(f"{run_seed}/{step}/{index}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def per_sample_noise(
    shape: Sequence[int], run_seed: int, step: int, indices: Sequence[int], purpose: str, device: torch.device
) -> torch.Tensor:
    """(B, *shape) standard normal noise on `device`, row i from sample indices[i]'s own generator. Drawn
    on the CPU (the same numbers on every device type), then moved."""
    return torch.stack([torch.randn(tuple(shape), generator=seeded(run_seed, step, i, purpose)) for i in indices]).to(device)


def per_sample_timesteps(
    method: MethodConfig, run_seed: int, step: int, indices: Sequence[int], purpose: str, device: torch.device
) -> torch.Tensor:
    """(B,) score timesteps on `device`: u ~ U[0, 1), shifted, clamped to [min_timestep, max_timestep]."""
    draws = [
        sample_timesteps(1, seeded(run_seed, step, i, purpose), method.shift, method.min_timestep, method.max_timestep)
        for i in indices
    ]
    return torch.cat(draws).to(device)


# ----------------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------------


class Pending(Protocol):
    def result(self) -> torch.Tensor: ...


@dataclass
class Ready:
    """A result computed in this process."""

    value: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.value


class RealScore(Protocol):
    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> Pending:
        """x0_cond + g (x0_cond - x0_uncond) at (x_t, t), uncond = the dataset's negative prompt; fp32."""
        ...


@dataclass
class FeedbackRequest:
    """What the generator step asks of the critic (every tensor detached)."""

    x_t: torch.Tensor  # the generated x0 noised at `t` (the same x_t the teacher scores)
    t: torch.Tensor  # (B,)
    x0: torch.Tensor  # the generated sample
    gan_t: torch.Tensor  # (B,) the GAN term's own timestep
    gan_noise: torch.Tensor
    text: torch.Tensor
    real: torch.Tensor  # real latents, for the relativistic GAN loss
    step: int  # the training step it belongs to (a critic actor group collects each step's requests)


@dataclass
class Feedback:
    x0_fake: torch.Tensor  # the critic's x0 at (x_t, t), fp32
    gan_gradient: torch.Tensor  # d [w_g * mean of the GAN generator losses] / d x0, fp32
    gan_losses: torch.Tensor  # (B,) each sample's unweighted GAN generator loss


@dataclass
class CriticBatch:
    """One critic update's inputs: a fresh rollout (no grad), real latents, and every random draw."""

    fake: torch.Tensor
    real: torch.Tensor
    text: torch.Tensor
    flow_t: torch.Tensor
    flow_noise: torch.Tensor
    disc_t: torch.Tensor  # real and fake are noised at the same t with the same noise
    disc_noise: torch.Tensor
    r1_noise: torch.Tensor
    r2_noise: torch.Tensor
    step: int


class CriticRole(Protocol):
    def feedback(self, request: FeedbackRequest) -> Feedback: ...

    def update(self, batch: CriticBatch) -> dict[str, float]: ...


class Optimised(Protocol):
    """A trainable module with its optimiser. `step` clips, steps, zeroes the grads and returns the grad
    norm before clipping. The master weights are the fp32 weights the optimiser updates, as this rank
    holds them (its ZeRO partitions, or the parameters themselves); `full_state` gathers them, or
    tensors laid out like them (an EMA), into the full fp32 weights by name; `shares_of` is its inverse.
    Both are collectives when the weights are partitioned."""

    module: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...

    def master_weights(self) -> list[torch.Tensor]: ...

    def full_state(self, masters: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...

    def shares_of(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]: ...


class TorchOptimised:
    """The plain loop's `Optimised`: the engines' fused AdamW and global-norm clipping, as DeepSpeed does them."""

    def __init__(self, module: nn.Module, lr: float, train: TrainConfig) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, lr, train)
        self.clip = train.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return scalar(norm)

    def master_weights(self) -> list[torch.Tensor]:
        return self.params

    def full_state(self, masters: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        values = dict(zip(self._names, masters if masters is not None else self.params))
        return {k: values.get(k, v).detach().float() for k, v in self.module.state_dict(keep_vars=True).items()}

    def shares_of(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [state[name].to(p.device, torch.float32) for name, p in zip(self._names, self.params)]

    @property
    def _names(self) -> list[str]:
        return [name for name, p in self.module.named_parameters() if p.requires_grad]


def teacher_real_x0(
    teacher: nn.Module, negative: torch.Tensor, guidance: float, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """The teacher's CFG real score, sample by sample: one sample's cond and uncond as one forward in the
    teacher's compute dtype (the 14B's activations over a 32,760-token clip for more than one pair at a
    time would not fit a 48 GB GPU beside its 28.6 GB of weights), x0 and the guidance combination in
    fp32 (a bf16 teacher's x0 would otherwise be combined at scale 1 + g in bf16)."""
    uncond = negative.to(text.device, text.dtype)[None]
    scores = []
    for i in range(x_t.shape[0]):
        x_in, t_in = x_t[i : i + 1].float().expand(2, *x_t.shape[1:]), t[i : i + 1].expand(2)
        with torch.no_grad():
            v = teacher(x_in, t_in, torch.cat([text[i : i + 1], uncond])).sample
        x0_cond, x0_uncond = x0_from_velocity(x_in, v.float(), t_in).chunk(2)
        scores.append(losses.real_x0(x0_cond, x0_uncond, guidance))
    return torch.cat(scores)


class LocalTeacher:
    """The real score in this process (plain loop, colocated runs)."""

    def __init__(self, teacher: nn.Module, negative: torch.Tensor, guidance: float) -> None:
        self.teacher, self.negative, self.guidance = teacher, negative, guidance

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> Ready:
        return Ready(teacher_real_x0(self.teacher, self.negative, self.guidance, x_t, t, text))


class LocalCritic:
    """The critic in this process, trained through an `Optimised` (torch, or a DeepSpeed engine)."""

    def __init__(self, critic: Optimised, method: MethodConfig) -> None:
        self.critic, self.method = critic, method

    @property
    def module(self) -> Critic:
        return self.critic.module

    def feedback(self, request: FeedbackRequest) -> Feedback:
        critic, m, text = self.module, self.method, request.text
        # Frozen for this pass: the gradient is taken w.r.t. the sample only, and a ZeRO engine's
        # gradient hooks must not fire (DESIGN §4).
        trainable = [p for p in critic.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                v, _ = critic(request.x_t, request.t, text, with_logits=False)
                x0_fake = x0_from_velocity(request.x_t.float(), v.float(), request.t)
                real_logits = None
                if m.gan_loss == "relativistic":
                    real_logits = critic.logits(add_noise(request.real, request.gan_noise, request.gan_t), request.gan_t, text)
            grad, per_sample = losses.gan_generator_gradient(
                request.x0, request.gan_noise, request.gan_t,
                lambda x: critic.logits(x, request.gan_t, text), m.gan_generator_weight, real_logits, m.gan_loss,
            )
        finally:
            for p in trainable:
                p.requires_grad_(True)
        return Feedback(x0_fake=x0_fake, gan_gradient=grad.float(), gan_losses=per_sample)

    def update(self, batch: CriticBatch) -> dict[str, float]:
        terms = critic_losses(self.module, batch, self.method)
        total = terms["critic_loss"]
        if not all_finite(total):
            return {"critic_skipped": 1.0, **{k: scalar(v) for k, v in terms.items()}}
        self.critic.backward(total)
        norm = self.critic.step()
        return {"critic_skipped": 0.0, "critic_grad_norm": norm, **{k: scalar(v) for k, v in terms.items()}}


def critic_losses(critic: Critic, b: CriticBatch, m: MethodConfig) -> dict[str, torch.Tensor]:
    """The critic's objective on one batch: flow matching on the generated samples at their own t, plus
    the discriminator loss on real and fake noised at one shared t and noise (one 2B forward), plus the
    optional finite-difference R1 (real) and R2 (fake, counted at 0.5). Everything here is fp32; the
    critic casts its inputs to its compute dtype."""
    text = b.text
    x_t = add_noise(b.fake, b.flow_noise, b.flow_t)
    v, _ = critic(x_t, b.flow_t, text, with_logits=False)
    flow = losses.flow_loss(v, b.flow_noise, b.fake)

    real_t = add_noise(b.real, b.disc_noise, b.disc_t)
    fake_t = add_noise(b.fake, b.disc_noise, b.disc_t)
    _, logits = critic(torch.cat([real_t, fake_t]), torch.cat([b.disc_t, b.disc_t]), torch.cat([text, text]))
    real_logits, fake_logits = logits.chunk(2)
    gan_d = losses.gan_discriminator_loss(real_logits, fake_logits, m.gan_loss)
    total = flow + m.gan_discriminator_weight * gan_d
    terms = {"critic_flow": flow, "gan_d": gan_d, "logits_real": real_logits.float().mean(), "logits_fake": fake_logits.float().mean()}

    def d(x: torch.Tensor) -> torch.Tensor:  # perturbed in fp32, cast only inside the forward
        return critic.logits(x, b.disc_t, text)

    if m.r1_weight > 0:
        terms["r1"] = losses.r1_penalty(d, real_t, b.r1_noise, m.r1_sigma)
        total = total + m.r1_weight * terms["r1"]
    if m.r2_weight > 0:
        terms["r2"] = losses.r2_penalty(d, fake_t, b.r2_noise, m.r2_sigma)
        total = total + 0.5 * m.r2_weight * terms["r2"]
    terms["critic_loss"] = total
    return {k: v if k == "critic_loss" else v.detach() for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Rows as a step consumes them; `indices` are the rows' global sample indices at this step."""

    ids: list[str]
    text: torch.Tensor  # (B, L, D)
    latent: torch.Tensor  # (B, C, F, H, W): the real sample of the GAN (a video's or the teacher's latent)
    indices: list[int]
    trajectory: torch.Tensor | None = None  # (B, K, C, F, H, W) for ODE init


class EMA:
    """An fp32 exponential moving average of the student's master weights, kept as this rank's share of
    them (laid out as `Optimised.master_weights()`, on their device): a step's update touches only that
    share, with no gather and no copy of the model; `full_state` gathers it (a collective) for
    checkpoints, samples and exports. Never the bf16 parameters: their rounding would enter the average."""

    def __init__(self, shares: list[torch.Tensor]) -> None:
        self.shares = [s.detach().float().clone() for s in shares]

    @classmethod
    def restore(cls, student: Optimised, state: dict[str, torch.Tensor]) -> EMA:
        """From a full state on disk (any world size wrote it), this rank's share."""
        return cls(student.shares_of(state))

    def update(self, masters: list[torch.Tensor], decay: float) -> None:
        for share, master in zip(self.shares, masters):
            share.mul_(decay).add_(master.detach().float(), alpha=1 - decay)

    def full_state(self, student: Optimised) -> dict[str, torch.Tensor]:
        return student.full_state(self.shares)


@dataclass
class StepContext:
    """Everything a step needs beyond its batch."""

    cfg: Config
    student: Optimised
    teacher: RealScore
    critic: CriticRole
    ema: EMA | None = None

    @property
    def steps_per_block(self) -> list[list[float]]:
        m = self.cfg.method
        steps = training_steps(m.denoising_steps, m.shift, m.warp_denoising_steps)
        return [steps] * self.cfg.model.num_blocks


def _student_rollout(ctx: StepContext, batch: Batch, step: int, purpose: str, with_grad: bool):
    cfg, student = ctx.cfg, ctx.student.module
    shape = (student.config.in_channels, cfg.model.num_latent_frames, cfg.model.latent_height, cfg.model.latent_width)
    noise = per_sample_noise(shape, cfg.train.seed, step, batch.indices, purpose, batch.latent.device)
    steps = ctx.steps_per_block
    exits = draw_exit_steps(
        len(steps), len(steps[0]), seeded(cfg.train.seed, step, -1, f"{purpose}/exit"), cfg.method.same_exit_step_across_blocks
    )
    renoise = [seeded(cfg.train.seed, step, i, f"{purpose}/renoise") for i in batch.indices]
    return rollout(
        student, noise, batch.text, steps, cfg.model.frames_per_block, exit_steps=exits,
        gradient_num_blocks=cfg.method.gradient_num_blocks if with_grad else 0,
        context_noise=cfg.method.context_noise, generator=renoise,
    )


def generator_step(ctx: StepContext, batch: Batch, step: int) -> dict[str, float]:
    """Rollout with grad on the last blocks; DMD from the teacher's and critic's scores plus the GAN
    gradient through the frozen critic, both on the sample; one optimiser step."""
    cfg, m = ctx.cfg, ctx.cfg.method
    seed, idx = cfg.train.seed, batch.indices
    out = _student_rollout(ctx, batch, step, "generator", with_grad=True)
    x0 = out.x0
    sample = x0.detach().float()
    device, shape = sample.device, sample.shape[1:]
    t = per_sample_timesteps(m, seed, step, idx, "dmd_t", device)
    x_t = add_noise(sample, per_sample_noise(shape, seed, step, idx, "dmd_noise", device), t)
    pending = ctx.teacher.real_x0(x_t, t, batch.text)  # in flight while the critic works
    gan_t = per_sample_timesteps(m, seed, step, idx, "gan_t", device)
    feedback = ctx.critic.feedback(FeedbackRequest(
        x_t=x_t, t=t, x0=sample, gan_t=gan_t, gan_noise=per_sample_noise(shape, seed, step, idx, "gan_noise", device),
        text=batch.text, real=batch.latent.float(), step=step,
    ))
    x0_real = pending.result()
    direction = losses.dmd_direction(sample, feedback.x0_fake, x0_real)
    gradient = losses.dmd_gradient(sample, direction, out.first_grad_frame) + feedback.gan_gradient
    metrics = {
        "dmd": scalar(losses.dmd_loss(sample, direction, out.first_grad_frame)),
        "gan_g": scalar(feedback.gan_losses.mean()),
        "dmd_normaliser": scalar((sample - x0_real).abs().mean()),
    }
    # Non-finite scores would vanish in the direction's nan_to_num: check what goes in, not only what comes out.
    if not all_finite(x0_real, feedback.x0_fake, gradient, feedback.gan_losses):
        return {**metrics, "generator_skipped": 1.0}
    ctx.student.backward((x0.float() * gradient).sum())  # d/dx0 of this surrogate is exactly `gradient`
    metrics["generator_grad_norm"] = ctx.student.step()
    if step >= cfg.train.ema_start_step:
        if ctx.ema is None:
            ctx.ema = EMA(ctx.student.master_weights())
        else:
            ctx.ema.update(ctx.student.master_weights(), cfg.train.ema_decay)
    return {**metrics, "generator_skipped": 0.0}


def critic_step(ctx: StepContext, batch: Batch, step: int) -> dict[str, float]:
    """A fresh rollout without grad; one critic update on it and the batch's real latents."""
    m, seed, idx = ctx.cfg.method, ctx.cfg.train.seed, batch.indices
    with torch.no_grad():
        fake = _student_rollout(ctx, batch, step, "critic", with_grad=False).x0.float()
    shape, device = fake.shape[1:], fake.device

    def noise(purpose: str) -> torch.Tensor:
        return per_sample_noise(shape, seed, step, idx, purpose, device)

    def timesteps(purpose: str) -> torch.Tensor:
        return per_sample_timesteps(m, seed, step, idx, purpose, device)

    return ctx.critic.update(CriticBatch(
        fake=fake, real=batch.latent.float(), text=batch.text,
        flow_t=timesteps("flow_t"), flow_noise=noise("flow_noise"), disc_t=timesteps("disc_t"), disc_noise=noise("disc_noise"),
        r1_noise=noise("r1_noise"), r2_noise=noise("r2_noise"), step=step,
    ))


def distill_step(ctx: StepContext, batch: Batch, step: int) -> dict[str, float]:
    """One One-Forcing step: on generator steps (step % gen_every == 0, step 0 included) the generator
    updates first; the critic updates every step."""
    metrics: dict[str, float] = {}
    if step % ctx.cfg.method.gen_every == 0:
        metrics.update(generator_step(ctx, batch, step))
    metrics.update(critic_step(ctx, batch, step))
    return metrics


def ode_init_step(student: Optimised, batch: Batch, step: int, cfg: Config, trajectory_timesteps: Sequence[float]) -> dict[str, float]:
    """ODE-regression init (CausVid): each block of the causal student starts from the teacher's ODE
    state at one trajectory point (drawn per sample and block) and regresses the ODE's clean end; one
    block-causal forward over the whole clip, per-frame timesteps."""
    if batch.trajectory is None or not trajectory_timesteps:
        raise ValueError("ODE init needs a dataset with trajectories (data.trajectory_steps)")
    model: CausalWanModel = student.module
    fpb, num_blocks = cfg.model.frames_per_block, cfg.model.num_blocks
    points = torch.stack([
        torch.randint(0, len(trajectory_timesteps), (num_blocks,), generator=seeded(cfg.train.seed, step, i, "ode_point"))
        for i in batch.indices
    ]).repeat_interleave(fpb, dim=1)  # (B, F): the trajectory point of each frame
    device = batch.trajectory.device
    points = points.to(device)
    rows = torch.arange(len(batch.indices), device=device)[:, None]
    frames = torch.arange(cfg.model.num_latent_frames, device=device)[None, :]
    by_frame = batch.trajectory.float().permute(0, 3, 1, 2, 4, 5)  # (B, F, K, C, H, W)
    x_t = by_frame[rows, frames, points].permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
    t = torch.tensor(trajectory_timesteps, dtype=torch.float32, device=device)[points]
    v = model(x_t, t, batch.text, frames_per_block=fpb).sample
    x0 = x0_from_velocity(x_t, v.float(), t)
    loss = losses.regression_loss(x0, batch.latent)
    if not all_finite(loss):
        return {"ode_loss": scalar(loss), "ode_skipped": 1.0}
    student.backward(loss)
    return {"ode_loss": scalar(loss), "ode_grad_norm": student.step(), "ode_skipped": 0.0}


# ----------------------------------------------------------------------------------------------------
# Data order and the plain reference loop
# ----------------------------------------------------------------------------------------------------


def global_indices(step: int, rank: int, world: int, batch_size: int) -> list[int]:
    """The global sample indices a rank's batch holds at `step` (independent of the data split)."""
    start = (step * world + rank) * batch_size
    return list(range(start, start + batch_size))


def rows_to_batch(rows: dict[str, Any], indices: list[int]) -> Batch:
    """A Batch from decoded rows (ids, text_embedding, latent, optional trajectory)."""
    trajectory = rows.get("trajectory")
    return Batch(
        ids=list(rows["id"]), text=rows["text_embedding"].float(), latent=rows["latent"].float(), indices=indices,
        trajectory=None if trajectory is None else trajectory.float(),
    )


def epoch_batches(rows: dict[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
    """The rows in order, `batch_size` at a time, round after round (the plain loop's data order)."""
    count = len(rows["id"])
    position = 0
    while True:
        take = [(position + i) % count for i in range(batch_size)]
        position += batch_size
        yield {k: (v[take] if isinstance(v, torch.Tensor) else [v[i] for i in take]) for k, v in rows.items() if v is not None}


def plain_context(cfg: Config, negative: torch.Tensor) -> StepContext:
    """Every role in this process: the student and critic with torch AdamW, the teacher in-process."""
    from pipeline.models.loading import load_critic, load_student, load_teacher

    student = load_student(cfg.model, checkpointing=cfg.train.gradient_checkpointing)
    return StepContext(
        cfg, TorchOptimised(student, cfg.train.lr, cfg.train),
        LocalTeacher(load_teacher(cfg.model), negative, cfg.method.real_guidance),
        LocalCritic(TorchOptimised(load_critic(cfg), cfg.train.critic_lr, cfg.train), cfg.method),
    )


def plain_distill(ctx: StepContext, batches: Iterable[dict[str, Any]], steps: range) -> list[dict[str, float]]:
    """The reference: the same step functions in one process, no Ray, no DeepSpeed."""
    history = []
    for step, rows in zip(steps, batches):
        batch = rows_to_batch(rows, global_indices(step, 0, 1, len(rows["id"])))
        history.append(distill_step(ctx, batch, step))
    return history
