"""The real-model path's two rules, on CPU: a model computes in its declared dtype (bf16 Wan configs),
never one read off a parameter; and every tensor a step makes lives on the device of the model it feeds,
every collective on its group's device. The meta device stands in for an accelerator: it runs shapes and
devices without values, and a CPU tensor mixed into a meta model fails as it would on CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline import distill, distributed
from pipeline.config import load_config
from pipeline.generation import ClipGenerator, GenerationSettings
from pipeline.models.codec import PatchCodec
from pipeline.models.loading import load_critic, load_student, load_teacher
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import WAN_CONFIGS, cast_like_from_pretrained
from tests.test_distill import tiny_config, write_tiny_dataset
from tests.test_generation import generation_config

META = torch.device("meta")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny_data"))
    write_tiny_dataset(out)
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# ----------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------


def test_a_bf16_wan_keeps_fp32_modules_and_declares_bf16():
    """The premise: diffusers keeps scale_shift_table (and norms, the time embedder) in fp32, and it is
    the first parameter a Wan model yields, so its dtype says nothing about how the model computes."""
    cfg = load_config(None, ["model.teacher_arch=tiny", "model.dtype=bfloat16"]).model
    teacher = load_teacher(cfg)
    assert next(teacher.parameters()).dtype == torch.float32
    assert teacher.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and teacher.compute_dtype == torch.bfloat16


def test_a_bf16_teacher_scores_like_the_fp32_one():
    """teacher_real_x0 on a bf16 teacher (it crashed at the patch embedding when the dtype was read off
    the first parameter) against the same weights in fp32: bf16's error, not a wrong computation."""
    config = load_config(None, ["model.teacher_arch=tiny"]).model
    exact, half = load_teacher(config), load_teacher(dataclasses.replace(config, dtype="bfloat16"))
    g = torch.Generator().manual_seed(0)
    x_t, text, negative = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(5, 32, generator=g)
    t = torch.tensor([300.0, 800.0])
    want = distill.teacher_real_x0(exact, negative, 2.0, x_t, t, text)
    got = distill.teacher_real_x0(half, negative, 2.0, x_t, t, text)
    assert got.dtype == torch.float32 and 0 < relative_error(got, want) < 3e-2
    # The same fp32 weights declared bf16 but left in fp32 would not run: the boundary cast is real.
    exact.compute_dtype = torch.bfloat16
    with pytest.raises(RuntimeError, match="dtype|type"):
        distill.teacher_real_x0(exact, negative, 2.0, x_t, t, text)


def test_a_bf16_student_generates_the_fp32_students_clip():
    torch.manual_seed(0)
    from pipeline.models.causal_wan import CausalWanModel

    student = CausalWanModel(**WAN_CONFIGS["toy-debug"])
    half = cast_like_from_pretrained(CausalWanModel(**WAN_CONFIGS["toy-debug"]), torch.bfloat16)
    half.load_state_dict(student.state_dict())
    cast_like_from_pretrained(half, torch.bfloat16)  # load_state_dict copies into the existing dtypes
    settings = GenerationSettings.from_config(generation_config())
    clips = [ClipGenerator(model, TextEncoder.toy(), PatchCodec(4), settings).generate("a red square moving left", 3)
             for model in (student, half)]
    error = float(np.abs(clips[1] - clips[0]).mean())
    assert 0 < error < 0.02, error


def test_a_bf16_critic_computes_its_losses_in_fp32_outside_the_model(tiny_data):
    """As under DeepSpeed's bf16 mode: every parameter bf16, compute dtype declared by the engine."""
    cfg = tiny_config(tiny_data, tiny_data, "bf16")
    exact = load_critic(cfg)
    half = load_critic(cfg).bfloat16()
    half.compute_dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    shape = (2, 4, 3, 8, 8)
    batch = distill.CriticBatch(
        fake=torch.randn(shape, generator=g), real=torch.randn(shape, generator=g), text=torch.randn(2, 5, 32, generator=g),
        flow_t=torch.tensor([200.0, 700.0]), flow_noise=torch.randn(shape, generator=g), disc_t=torch.tensor([400.0, 900.0]),
        disc_noise=torch.randn(shape, generator=g), r1_noise=torch.randn(shape, generator=g), r2_noise=torch.randn(shape, generator=g),
        step=0,
    )
    want, got = distill.critic_losses(exact, batch, cfg.method), distill.critic_losses(half, batch, cfg.method)
    for key in ("critic_flow", "gan_d", "critic_loss"):
        assert got[key].dtype == torch.float32 and float(got[key].detach()) == pytest.approx(float(want[key].detach()), rel=3e-2), key


# ----------------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------------


def meta_context(cfg, negative: torch.Tensor) -> distill.StepContext:
    """The plain loop's roles with every model on the meta device (moved before the optimisers are
    made: moving a module across device types replaces its parameters)."""
    student = load_student(cfg.model).to(META)
    critic = load_critic(cfg).to(META)
    teacher = load_teacher(cfg.model).to(META)
    return distill.StepContext(
        cfg, distill.TorchOptimised(student, cfg.train.lr, cfg.train),
        distill.LocalTeacher(teacher, negative.to(META), cfg.method.real_guidance),
        distill.LocalCritic(distill.TorchOptimised(critic, cfg.train.critic_lr, cfg.train), cfg.method),
    )


def meta_batch(tiny_data: str, with_trajectory: bool = False) -> distill.Batch:
    from pipeline import data

    rows = next(distill.epoch_batches(data.read_dataset(tiny_data), 2))
    batch = distill.rows_to_batch(rows, [0, 1])
    batch.text, batch.latent = batch.text.to(META), batch.latent.to(META)
    batch.trajectory = batch.trajectory.to(META) if with_trajectory else None
    return batch


def updated_on_meta(optimised: distill.TorchOptimised) -> bool:
    """Every trainable parameter got a gradient and an Adam update, on the meta device."""
    state = optimised.optimizer.state
    return all(p.device == META and p in state and state[p]["exp_avg"].device == META for p in optimised.params)


def test_a_cpu_tensor_mixed_into_a_meta_model_fails():
    """The stand-in catches what a GPU would: the step functions used to draw noise on the CPU."""
    from pipeline.models.causal_wan import CausalWanModel

    model = CausalWanModel(**WAN_CONFIGS["tiny"]).to(META)
    text = torch.zeros(1, 5, 32, device=META)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta|device"):
        model(torch.zeros(1, 4, 3, 8, 8), torch.zeros(1, device=META), text)


def test_a_generator_and_a_critic_step_with_every_model_on_another_device(tiny_data):
    from pipeline import data

    cfg = tiny_config(tiny_data, tiny_data, "meta")
    ctx = meta_context(cfg, data.read_negative_prompt(tiny_data))
    batch = meta_batch(tiny_data)
    generator = distill.generator_step(ctx, batch, 0)
    assert generator["generator_skipped"] == 0.0 and updated_on_meta(ctx.student)
    critic = distill.critic_step(ctx, batch, 1)
    assert critic["critic_skipped"] == 0.0 and updated_on_meta(ctx.critic.critic)


def test_an_ode_init_step_with_the_student_on_another_device(tiny_data):
    from pipeline import data

    cfg = tiny_config(tiny_data, tiny_data, "meta-ode")
    student = distill.TorchOptimised(load_student(cfg.model, for_ode_init=True).to(META), cfg.train.lr, cfg.train)
    info = data.read_info(tiny_data)
    metrics = distill.ode_init_step(student, meta_batch(tiny_data, with_trajectory=True), 0, cfg, list(info.trajectory_timesteps))
    assert metrics["ode_skipped"] == 0.0 and updated_on_meta(student)


class RecordingCritic:
    """The plain loop's critic, keeping what the steps asked of it (what a Train worker sends an actor)."""

    def __init__(self, critic: distill.LocalCritic) -> None:
        self.critic, self.asked = critic, []

    def feedback(self, request):
        self.asked.append(request)
        return self.critic.feedback(request)

    def update(self, batch):
        self.asked.append(batch)
        return self.critic.update(batch)


def test_the_critic_and_teacher_actors_compute_on_their_own_device(tiny_data):
    """The actor placement: what a Train worker sends over the wire (numpy, from a step on the CPU)
    lands on the actor's device, and the actor's feedback, update and real score run there with every
    model on the meta device (a tensor created on the CPU inside would fail, as above)."""
    from actors.critic import CriticActor, to_wire
    from actors.teacher import TeacherScoreActor
    from pipeline import data

    cfg = tiny_config(tiny_data, tiny_data, "meta-actors")
    negative = data.read_negative_prompt(tiny_data)
    teacher = load_teacher(cfg.model)
    recorder = RecordingCritic(distill.LocalCritic(distill.TorchOptimised(load_critic(cfg), cfg.train.critic_lr, cfg.train), cfg.method))
    student = load_student(cfg.model)
    ctx = distill.StepContext(cfg, distill.TorchOptimised(student, cfg.train.lr, cfg.train),
                              distill.LocalTeacher(teacher, negative, cfg.method.real_guidance), recorder)
    batch = next(distill.epoch_batches(data.read_dataset(tiny_data), 2))
    batch = distill.rows_to_batch(batch, [0, 1])
    distill.generator_step(ctx, batch, 0)
    distill.critic_step(ctx, batch, 1)
    request, update = recorder.asked

    actor = object.__new__(CriticActor)  # its state once formed, without Ray, a group or DeepSpeed
    actor.device, actor.worker_batch, actor.senders = META, 2, [0]
    actor.critic = distill.LocalCritic(distill.TorchOptimised(load_critic(cfg).to(META), cfg.train.critic_lr, cfg.train), cfg.method)
    feedback, gradient = actor.feedback_on_device([to_wire(request, 0, 2)])
    assert {feedback.x0_fake.device, feedback.gan_gradient.device, gradient.device} == {META}
    assert feedback.x0_fake.shape == request.x0.shape
    metrics = actor._update([to_wire(update, 0, 2)])[0]
    assert metrics["critic_skipped"] == 0.0 and updated_on_meta(actor.critic.critic)

    scorer = object.__new__(TeacherScoreActor)
    scorer.device, scorer.guidance = META, cfg.method.real_guidance
    scorer.teacher, scorer.negative = load_teacher(cfg.model).to(META), negative.to(META)
    score = scorer.real_x0_on_device(request.x_t, request.t, request.text)  # CPU tensors, as from the wire
    assert score.device == META and score.shape == request.x_t.shape


class CollectiveSeen(Exception):
    pass


@pytest.mark.parametrize("backend, device", [("nccl", "cuda:0"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_collectives_take_tensors_on_their_groups_device(monkeypatch, backend, device):
    """Under NCCL (Ray Train's backend on GPUs) the metrics and the finiteness flag are reduced as CUDA
    tensors; a CPU tensor there raises "No backend type associated with device type cpu"."""
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise CollectiveSeen

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.collective_device() == torch.device(device)
    # Where the group's device is an accelerator this machine lacks, the stand-in takes its place.
    monkeypatch.setattr(distributed, "collective_device", lambda: META if device != "cpu" else torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for call in (lambda: distributed.mean_over_ranks({"loss": 1.0}), lambda: distributed.all_finite(torch.ones(2))):
        with pytest.raises(CollectiveSeen):
            call()
    assert seen == [META if device != "cpu" else torch.device("cpu")] * 2
