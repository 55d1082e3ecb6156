"""What each role of a distillation run needs per GPU and how long its share of a step takes: the planner
behind `jobs/plan.py` (and the last table of `jobs/distill.py --dry-run`).

Per role (student workers, teacher actors, critic actors, encoder, generator):
- parameters, counted on the meta device from the config's architectures;
- model states per GPU: DeepSpeed's own estimator for the config's ZeRO stage (bf16 parameters, fp32
  master, gradients and Adam moments), plus what this project adds (the EMA's share of the fp32
  masters, two fp32 reduce buckets in flight under `overlap_comm`); frozen roles hold bf16 weights;
- activations kept for backward and the KV cache, at the config's clip size, with and without activation
  checkpointing: from bytes per token per layer measured at the 1.3B's true width on CPU
  (`pipeline/assets/activation_bytes.json`, written by `python bench/activations.py --measure`) and
  scaled by width for other architectures;
- FLOPs per training step and the time they take on the GPU the role's node type declares in
  `cluster.yaml` (its instance type), at a stated model-FLOPs utilisation.
Then which role bounds the step, how many teacher and critic actors would balance it, and, for every
role that does not fit its GPU, one line saying so.

Model and its limits: a forward's FLOPs are its matmuls (2 per multiply-add) and attention scores; a
backward costs two forwards and checkpointing one more; the bf16 peak is the dense one; the MFU (35%
by default) is an assumption; one H200 ran a whole step at 28-33% (bench/RESULTS.md). The FLOP count
of a step is checked against torch's own count (tests/test_capacity.py). Transient memory (one layer's
activations in a frozen forward, the VAE) is estimated, not measured; a role fits when its total stays
under 90% of the GPU's memory (CUDA context, allocator slack).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.config import Config, MethodConfig

ACTIVATION_FILE = Path(__file__).parent / "assets" / "activation_bytes.json"
CLUSTER_FILE = Path(__file__).resolve().parents[1] / "cluster.yaml"  # the repository's launcher file
MEASURED_ARCH = "wan2.1-t2v-1.3b"  # where the activation bytes were measured
MEASURED_WIDTH = 1536  # its width
WAN_TEXT_TOKENS = 512  # Wan pads every prompt's embedding to 512 tokens
MFU = 0.35
USABLE = 0.9  # of a GPU's memory
BALANCED = 1.25  # the slowest of student, teacher and critic within this factor of the fastest
GB = 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense peak


GPUS = {
    "A100-40GB": GPU("A100-40GB", 40, 312), "A100-80GB": GPU("A100-80GB", 80, 312),
    "H100": GPU("H100", 80, 989), "H200": GPU("H200", 141, 989), "L40S": GPU("L40S", 48, 362),
}
# AWS instance types -> (GPU, GPUs per node); cluster.yaml's node types name one of these.
INSTANCES = {
    "p4d.24xlarge": ("A100-40GB", 8), "p4de.24xlarge": ("A100-80GB", 8), "p5.48xlarge": ("H100", 8),
    "p5e.48xlarge": ("H200", 8), "p5en.48xlarge": ("H200", 8),
    **{f"g6e.{size}": ("L40S", 1) for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6e.12xlarge": ("L40S", 4), "g6e.24xlarge": ("L40S", 4), "g6e.48xlarge": ("L40S", 8),
}


# ----------------------------------------------------------------------------------------------------
# Measured activation bytes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockBytes:
    """Bytes one Wan block keeps for backward, per video token, per text token, at MEASURED_WIDTH."""

    per_video_token: float
    per_text_token: float
    outside_per_video_token: float = 0.0  # patch and time embeddings and the head: once per forward
    outside_per_text_token: float = 0.0  # the text embedder: once per forward
    head_per_video_token: float = 0.0  # of that, the head's (norm_out, proj_out): not held by a logits-only forward


@dataclass(frozen=True)
class DtypeBytes:
    unchecked: BlockBytes
    checkpointed: BlockBytes
    tap_unchecked: float  # a GAN tap, per token of the feature map it reads
    tap_checkpointed: float

    def block(self, checkpointing: bool) -> BlockBytes:
        return self.checkpointed if checkpointing else self.unchecked

    def tap(self, checkpointing: bool) -> float:
        return self.tap_checkpointed if checkpointing else self.tap_unchecked


@dataclass(frozen=True)
class ActivationBytes:
    by_dtype: dict[str, DtypeBytes]
    command: str

    @classmethod
    def load(cls, path: Path = ACTIVATION_FILE) -> ActivationBytes:
        raw = json.loads(path.read_text())
        by_dtype = {
            name: DtypeBytes(BlockBytes(**d["block"]["unchecked"]), BlockBytes(**d["block"]["checkpointed"]),
                             d["gan_tap"]["unchecked"], d["gan_tap"]["checkpointed"])
            for name, d in raw["bytes"].items()
        }
        return cls(by_dtype, raw["command"])

    def for_dtype(self, name: str) -> DtypeBytes:
        return self.by_dtype[name]


def measurement_model(layers: int, dtype: torch.dtype, checkpointing: bool, seed: int = 0):
    """A random-init causal Wan at the measured architecture's true width with `layers` layers, cast as a
    loaded model is, in training mode: what the activation bytes are measured and checked on."""
    from pipeline.models.causal_wan import CausalWanModel
    from pipeline.models.wan_weights import WAN_CONFIGS, cast_like_from_pretrained

    torch.manual_seed(seed)
    model = cast_like_from_pretrained(CausalWanModel(**{**WAN_CONFIGS[MEASURED_ARCH], "num_layers": layers}), dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def held_for_backward(forward) -> int:
    """Heap bytes a forward with grad still holds when it returns (the graph and what it saved), beyond
    its output, measured as malloc's bytes in use. How the activation bytes were measured, and how
    predictions are checked.

    No backward runs: dropping the output frees the graph and what it saved, and a backward would
    cost far more than the forward where the CPU has no native bf16 GEMM (AVX2 only: torch's fallback
    multiplies a gradient by an untransposed weight at under 1 GFLOP/s)."""
    from pipeline.distributed import heap_bytes

    gc.collect()  # a previous measurement's cycles (checkpoint frames) must not be freed during this one
    before = heap_bytes()
    out = forward()
    return heap_bytes() - before - out.numel() * out.element_size()


# ----------------------------------------------------------------------------------------------------
# Workloads: what is held for backward, and FLOPs
# ----------------------------------------------------------------------------------------------------


def _width(arch: dict) -> int:
    return arch["num_attention_heads"] * arch["attention_head_dim"]


def _forward_held(
    table: DtypeBytes, arch: dict, layers: int, tokens: int, text_tokens: int, checkpointing: bool, head: bool = True
) -> float:
    """One forward with grad over `tokens` video tokens: what it keeps until its backward. `head`: its
    velocity is used (a critic's logits-only forward drops the head's graph)."""
    b, scale = table.block(checkpointing), _width(arch) / MEASURED_WIDTH
    per_layer = b.per_video_token * tokens + b.per_text_token * text_tokens
    outside = (b.outside_per_video_token - (0.0 if head else b.head_per_video_token)) * tokens
    return scale * (layers * per_layer + outside + b.outside_per_text_token * text_tokens)


def inference_transient(arch: dict, tokens: int, batch: int, dtype_bytes: int) -> float:
    """What a forward without grad holds at its widest point, one layer at a time: the block's input,
    its q, k, v and attention output, and the FFN's hidden layer before and after the activation (an
    estimate: nothing is kept from layer to layer)."""
    return batch * tokens * (6 * _width(arch) + 2 * arch["ffn_dim"]) * dtype_bytes


def kv_bytes_per_token(arch: dict, layers: int, dtype_bytes: int) -> float:
    """A cached token's keys and values over every layer."""
    return 2 * _width(arch) * dtype_bytes * layers


def rollout_bytes(
    table: DtypeBytes, arch: dict, *, layers: int, batch: int, frames: int, frames_per_block: int, grad_blocks: int,
    tokens_per_frame: int, text_tokens: int, checkpointing: bool, dtype_bytes: int,
) -> float:
    """What a self-forcing rollout keeps for backward beyond its KV cache: each grad block's forward;
    without checkpointing also the copy of the cache its attention saved ([cache ; block] keys and values)."""
    block_tokens = frames_per_block * tokens_per_frame
    blocks = frames // frames_per_block
    held = 0.0
    for b in range(blocks - grad_blocks, blocks):
        held += _forward_held(table, arch, layers, block_tokens, text_tokens, checkpointing)
        if not checkpointing:
            held += kv_bytes_per_token(arch, layers, dtype_bytes) * b * block_tokens
    return batch * held


def kv_cache_bytes(arch: dict, *, layers: int, batch: int, cached_frames: int, tokens_per_frame: int, dtype_bytes: int) -> float:
    return batch * kv_bytes_per_token(arch, layers, dtype_bytes) * cached_frames * tokens_per_frame


def critic_forwards_with_grad(method: MethodConfig) -> int:
    """Per sample of an update: flow (1), discriminator on real and fake (2), R1 and R2 (2 each, D(x + s e)
    and D(x)): all held until the one backward."""
    return 3 + 2 * (method.r1_weight > 0) + 2 * (method.r2_weight > 0)


def critic_update_bytes(
    table: DtypeBytes, arch: dict, *, layers: int, samples: int, tokens: int, text_tokens: int, feature_layers: list[int],
    method: MethodConfig, checkpointing: bool, dtype_bytes: int,
) -> float:
    """What a critic update keeps for backward. The flow forward keeps every layer and the head; a
    logits-only forward (discriminator, R1, R2) only the layers up to the last tapped one (what comes
    after feeds nothing its loss reads), that layer's output (which only its tap reads) and its taps."""
    forwards = critic_forwards_with_grad(method) * samples
    with_logits = forwards - samples  # the flow forward reads no taps and is the only one whose velocity counts
    flow = _forward_held(table, arch, layers, tokens, text_tokens, checkpointing)
    logits = _forward_held(table, arch, max(feature_layers) + 1, tokens, text_tokens, checkpointing, head=False)
    taps_held = len(feature_layers) * table.tap(checkpointing) * tokens * _width(arch) / MEASURED_WIDTH
    last_map = tokens * _width(arch) * dtype_bytes
    return samples * flow + with_logits * (logits + taps_held + last_map)


def forward_flops(arch: dict, layers: int, tokens: int, keys: float, text_tokens: int) -> float:
    """One forward over `tokens` query tokens whose self-attention sees `keys` keys on average."""
    d, ffn = _width(arch), arch["ffn_dim"]
    matmuls = tokens * (6 * d * d + 2 * d * ffn) + text_tokens * 2 * d * d  # self qkvo + cross qo, ffn; cross kv
    attention = tokens * 2 * d * (keys + text_tokens)
    return 2 * layers * (matmuls + attention)


def rollout_flops(arch: dict, layers: int, blocks: int, block_tokens: int, text_tokens: int, grad_blocks: int,
                  checkpointing: bool) -> float:
    """A one-step rollout: each block's forward (grad blocks with their backward) and its cache write."""
    train = 4 if checkpointing else 3
    total = 0.0
    for b in range(blocks):
        keys = b * block_tokens + block_tokens
        step = forward_flops(arch, layers, block_tokens, keys, text_tokens)
        total += step * (train if b >= blocks - grad_blocks else 1) + (step if b + 1 < blocks else 0)
    return total


# ----------------------------------------------------------------------------------------------------
# Model states
# ----------------------------------------------------------------------------------------------------


def count_parameters(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def trained_states_bytes(params: int, zero_stage: int, ranks: int, bf16: bool, ema: bool) -> tuple[float, float]:
    """(ours, DeepSpeed's estimator) model states per GPU of a trained role at its peak, inside its own
    update. Ours adds the EMA's share and the reduce buckets to the estimator's figure; fp32 without ZeRO
    is 16 bytes a parameter."""
    if not bf16 and zero_stage == 0:
        estimate = 16 * params
    elif zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        estimate = estimate_zero3_model_states_mem_needs(params, 0, ranks, 1, cpu_offload=False)[1]
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        estimate = estimate_zero2_model_states_mem_needs(params, ranks, 1, cpu_offload=False)[1]
        if zero_stage == 1:  # gradients not partitioned
            estimate += 2 * params * (1 - 1 / ranks)
    ours = estimate + (4 * params / ranks if ema else 0) + _reduce_buckets(params, zero_stage)
    return ours, estimate


def _reduce_buckets(params: int, zero_stage: int) -> float:
    """fp32 reduce buckets: two in flight under ZeRO-2/3's `overlap_comm`, one otherwise."""
    from pipeline.engines import BUCKET_ELEMENTS

    buckets = 2 * 4 * BUCKET_ELEMENTS if zero_stage >= 2 else 4 * BUCKET_ELEMENTS
    return min(buckets, 4 * params)


def update_states_bytes(params: int, zero_stage: int, ranks: int, bf16: bool) -> float:
    """The part of `trained_states_bytes` that lives only while the role updates: gradients (bf16 and
    their fp32 partition; fp32 without ZeRO) and the reduce buckets. Between updates DeepSpeed has freed
    them: on an H200 (bench/RESULTS.md) the resident memory between steps was the bf16 weights, fp32
    masters and Adam moments alone, within 0.3%."""
    if not bf16 and zero_stage == 0:
        grads = 4 * params
    elif zero_stage == 1:  # the bf16 gradients whole, their fp32 copy partitioned
        grads = 2 * params + 4 * params / ranks
    else:
        grads = 6 * params / ranks
    return grads + _reduce_buckets(params, zero_stage)


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------


@dataclass
class RolePlan:
    role: str
    count: int
    gpu: GPU | None
    params: int
    states: float  # bytes per GPU
    activations: float  # with the config's checkpointing setting
    activations_other: float  # with it flipped
    kv_cache: float
    transient: float
    tflop_per_step: float  # this role's whole work per training step, over all its GPUs
    deepspeed_estimate: float = 0.0
    update_states: float = 0.0  # the part of `states` alive only during this role's own update
    notes: list[str] = field(default_factory=list)
    inside: list[RolePlan] = field(default_factory=list)  # trained roles that take their turn in these GPUs

    @property
    def turn(self) -> float:
        """What this role holds above its resident states during its own part of a step."""
        return self.update_states + self.activations + self.kv_cache + self.transient

    @property
    def resident(self) -> float:
        """What stays on these GPUs between steps: every role's states but its update's."""
        return sum(r.states - r.update_states for r in (self, *self.inside))

    @property
    def total(self) -> float:
        """The resident states plus the largest turn: the roles inside a Train worker take turns (on a
        generator step the generator's turn, then the critic's update), so one at a time holds
        gradients and activations. For a role alone: states + activations + KV + transient."""
        return self.resident + max(r.turn for r in (self, *self.inside))

    def summed(self, name: str) -> float:
        """A column of the table for these GPUs: this role's figure plus those of the roles inside it."""
        return sum(getattr(r, name) for r in (self, *self.inside))

    @property
    def seconds_per_step(self) -> float:
        if self.gpu is None or not self.tflop_per_step:
            return 0.0
        return self.tflop_per_step / (self.count * self.gpu.bf16_tflops * MFU)

    @property
    def fits(self) -> bool:
        return self.gpu is None or self.total <= USABLE * self.gpu.memory_gb * GB


@dataclass
class Plan:
    config: str
    checkpointing: bool
    roles: list[RolePlan]
    bound: str
    matching: dict[str, int]  # teacher and critic actor counts that would take the student's time
    spread: float  # slowest over fastest of the student's, teacher's and critic's time per step

    @property
    def balanced(self) -> bool:
        return self.spread <= BALANCED

    def refusals(self) -> list[str]:
        return [f"{r.role}: needs {r.total / GB:.1f} GB per GPU, over {USABLE:.0%} of a {r.gpu.name}'s "
                f"{r.gpu.memory_gb:g} GB" for r in self.roles if not r.fits]


def node_gpus(cluster: dict[str, Any]) -> dict[str, tuple[GPU, int]]:
    """Each custom resource of cluster.yaml's node types -> the GPU type of the node offering it."""
    found = {}
    for node in cluster.get("available_node_types", {}).values():
        instance = node.get("node_config", {}).get("InstanceType", "")
        if instance not in INSTANCES:
            continue
        gpu, per_node = INSTANCES[instance]
        for resource in node.get("resources", {}):
            if resource not in ("CPU", "GPU", "memory"):
                found[resource] = (GPUS[gpu], per_node)
    return found


def _role_gpu(resources: dict[str, float], gpus: dict[str, tuple[GPU, int]]) -> GPU | None:
    for resource in resources:
        if resource in gpus:
            return gpus[resource][0]
    return None


@dataclass(frozen=True)
class _Run:
    """What every role's figures are computed from: the config's shapes, resolved once."""

    cfg: Config
    table: DtypeBytes
    gpus: dict[str, tuple[GPU, int]]
    student: dict
    teacher: dict
    critic: dict
    dtype_bytes: int
    tokens_per_frame: int
    text_tokens: int = WAN_TEXT_TOKENS

    @property
    def clip_tokens(self) -> int:
        return self.cfg.model.num_latent_frames // self.student["patch_size"][0] * self.tokens_per_frame

    @property
    def block_tokens(self) -> int:
        return self.cfg.model.frames_per_block * self.tokens_per_frame

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.ray.num_workers

    @property
    def generator_share(self) -> float:  # generator steps per step
        return 1 / self.cfg.method.gen_every

    @cached_property
    def student_params(self) -> int:  # the student's role and the generator's both hold it
        from pipeline.models.causal_wan import CausalWanModel

        return count_parameters(lambda: CausalWanModel(**self.student))


def plan(cfg: Config, cluster: dict[str, Any], table: ActivationBytes | None = None) -> Plan:
    from pipeline.models.wan_weights import WAN_CONFIGS

    m, r = cfg.model, cfg.ray
    bf16 = m.dtype == "bfloat16"
    student = WAN_CONFIGS[m.student_arch]
    _, p_h, p_w = student["patch_size"]
    run = _Run(cfg, (table or ActivationBytes.load()).for_dtype(m.dtype), node_gpus(cluster), student,
               WAN_CONFIGS[m.teacher_arch], WAN_CONFIGS[m.critic_arch], 2 if bf16 else 4,
               (m.latent_height // p_h) * (m.latent_width // p_w))
    roles = [_student_role(run)]
    for role, inside, note in ((_teacher_role(run), r.teacher_actors == 0, "the teacher runs inside each Train worker "
                                "(ray.teacher_actors: 0)"),
                               (_critic_role(run), r.critic_placement == "trainer", "the critic runs inside each Train "
                                "worker (ray.critic_placement: trainer)")):
        if inside:
            _merge(roles[0], role, note)
        else:
            roles.append(role)
    roles += _inference_roles(run)
    timed = {role.role: role.seconds_per_step for role in roles if role.role in ("student", "teacher", "critic")}
    student_time = timed["student"]
    matching = {role: max(1, round(count * timed[role] / student_time)) if student_time else count
                for role, count in (("teacher", r.teacher_actors), ("critic", r.critic_actors)) if role in timed}
    spread = max(timed.values()) / min(timed.values()) if min(timed.values()) > 0 else 1.0
    return Plan(cfg.name, cfg.train.gradient_checkpointing, roles, max(timed, key=timed.get), matching, spread)


def _student_role(run: _Run) -> RolePlan:
    """The Train workers: model states under ZeRO with the EMA, the larger of a rollout's and ODE init's
    activations, the KV cache; a critic step's rollout every step, a generator step's every gen_every."""
    m, t, method, arch = run.cfg.model, run.cfg.train, run.cfg.method, run.student
    layers, grad_blocks = arch["num_layers"], min(method.gradient_num_blocks, m.num_blocks)

    def activations(checkpointing: bool) -> float:
        rollout = rollout_bytes(run.table, arch, layers=layers, batch=t.batch_size, frames=m.num_latent_frames,
                                frames_per_block=m.frames_per_block, grad_blocks=grad_blocks,
                                tokens_per_frame=run.tokens_per_frame, text_tokens=run.text_tokens,
                                checkpointing=checkpointing, dtype_bytes=run.dtype_bytes)
        ode_init = t.batch_size * _forward_held(run.table, arch, layers, run.clip_tokens, run.text_tokens, checkpointing)
        return max(rollout, ode_init)

    params, bf16, ranks = run.student_params, m.dtype == "bfloat16", run.cfg.ray.num_workers
    states, estimate = trained_states_bytes(params, t.zero_stage, ranks, bf16, ema=True)
    kv = kv_cache_bytes(arch, layers=layers, batch=t.batch_size, cached_frames=m.num_latent_frames - m.frames_per_block,
                        tokens_per_frame=run.tokens_per_frame, dtype_bytes=run.dtype_bytes)
    ckpt = t.gradient_checkpointing
    generator = rollout_flops(arch, layers, m.num_blocks, run.block_tokens, run.text_tokens, grad_blocks, ckpt)
    critic_step = rollout_flops(arch, layers, m.num_blocks, run.block_tokens, run.text_tokens, 0, ckpt)
    flops = run.global_batch * (run.generator_share * generator + critic_step)
    gpu = _role_gpu(run.cfg.ray.resources_per_worker, run.gpus)
    return RolePlan("student", ranks, gpu, params, states, activations(ckpt), activations(not ckpt), kv,
                    0.0, flops / 1e12, estimate, update_states_bytes(params, t.zero_stage, ranks, bf16))


def _teacher_role(run: _Run) -> RolePlan:
    """Frozen weights in `model.dtype`; one sample's cond and uncond per forward, on generator steps."""
    from pipeline.models.causal_wan import CausalWanModel

    arch, r = run.teacher, run.cfg.ray
    params = count_parameters(lambda: CausalWanModel(**arch))
    forward = forward_flops(arch, arch["num_layers"], run.clip_tokens, run.clip_tokens, run.text_tokens)
    flops = run.global_batch * run.generator_share * 2 * forward
    transient = inference_transient(arch, run.clip_tokens, 2, run.dtype_bytes)
    return RolePlan("teacher", max(r.teacher_actors, 1), _role_gpu(r.teacher_resources, run.gpus), params,
                    run.dtype_bytes * params, 0.0, 0.0, 0.0, transient, flops / 1e12)


def _critic_role(run: _Run) -> RolePlan:
    """Trunk and GAN heads under ZeRO over their ranks (the actor group, or the Train workers); an update
    on its share of the batch every step, the generator's feedback on generator steps."""
    from pipeline.models.causal_wan import CausalWanModel
    from pipeline.models.discriminator import GANHeads

    arch, r, method, t = run.critic, run.cfg.ray, run.cfg.method, run.cfg.train
    disc = method.discriminator
    heads = lambda: GANHeads(_width(arch), len(disc.feature_layers), disc.num_registers, disc.num_heads,  # noqa: E731
                             disc.ffn_dim, disc.hidden_dim, disc.timestep_conditioning)
    params = count_parameters(lambda: CausalWanModel(**arch)) + count_parameters(heads)
    on_actors = r.critic_placement == "actors"
    ranks = r.critic_actors if on_actors else r.num_workers
    share = math.ceil(run.global_batch / ranks)

    def update(checkpointing: bool) -> float:
        return critic_update_bytes(run.table, arch, layers=arch["num_layers"], samples=share, tokens=run.clip_tokens,
                                   text_tokens=run.text_tokens, feature_layers=list(disc.feature_layers), method=method,
                                   checkpointing=checkpointing, dtype_bytes=run.dtype_bytes)

    # A logits-only forward runs the trunk up to its last tapped layer (Critic.logits). The generator's
    # feedback: the fake score (no grad), then the GAN loss's forward with its backward to the sample
    # (no recomputation: the frozen critic keeps its graph). Checked against torch's count of a step
    # (tests/test_capacity.py).
    train = 4 if t.gradient_checkpointing else 3
    full = forward_flops(arch, arch["num_layers"], run.clip_tokens, run.clip_tokens, run.text_tokens)
    tapped = forward_flops(arch, max(disc.feature_layers) + 1, run.clip_tokens, run.clip_tokens, run.text_tokens)
    update_flops = train * (full + (critic_forwards_with_grad(method) - 1) * tapped)
    feedback_flops = full + 3 * tapped
    flops = run.global_batch * (update_flops + run.generator_share * feedback_flops)
    bf16 = run.cfg.model.dtype == "bfloat16"
    states, estimate = trained_states_bytes(params, t.zero_stage, ranks, bf16, ema=False)
    gpu = _role_gpu(r.critic_resources if on_actors else r.resources_per_worker, run.gpus)
    return RolePlan("critic", ranks, gpu, params, states, update(t.gradient_checkpointing),
                    update(not t.gradient_checkpointing), 0.0, 0.0, flops / 1e12, estimate,
                    update_states_bytes(params, t.zero_stage, ranks, bf16))


def _merge(into: RolePlan, other: RolePlan, note: str) -> None:
    """A role placed inside the Train workers: its memory and time are theirs. A frozen teacher's weights
    stay, and its forward falls in the generator's turn; a trained critic takes its own turn."""
    if other.update_states:
        into.inside.append(other)
    else:
        into.states += other.states
        into.transient = max(into.transient, other.transient)
    into.tflop_per_step += other.tflop_per_step
    into.notes.append(note)


def _inference_roles(run: _Run) -> list[RolePlan]:
    """The encoder actors (umT5-XXL and the VAE, preprocessing) and the generator (the one-step student,
    its text encoder and VAE, a clip's KV cache)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    cfg, student = run.cfg, run.student
    wan = cfg.model.student_arch.startswith("wan")
    encoder_params = count_parameters(lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    ))) if wan else 0
    vae_params = count_parameters(lambda: AutoencoderKLWan()) if wan else 0
    n_student = run.student_params
    frames = cfg.generate.num_latent_frames or cfg.model.num_latent_frames
    cached = min(frames, cfg.generate.cache_window or frames) - cfg.model.frames_per_block
    kv = kv_cache_bytes(student, layers=student["num_layers"], batch=1, cached_frames=max(cached, 0),
                        tokens_per_frame=run.tokens_per_frame, dtype_bytes=run.dtype_bytes)
    block = inference_transient(student, run.block_tokens, 1, run.dtype_bytes)
    r, g = cfg.ray, cfg.generate
    return [
        RolePlan("encoder", r.encoder_actors, _role_gpu(r.encoder_resources, run.gpus), encoder_params + vae_params,
                 2 * (encoder_params + vae_params), 0.0, 0.0, 0.0, 0.0, 0.0, notes=["VAE encode activations not modelled"]),
        RolePlan("generator", g.actors, _role_gpu(g.resources, run.gpus), n_student + encoder_params + vae_params,
                 2 * (n_student + encoder_params + vae_params), 0.0, 0.0, kv, block, 0.0,
                 notes=["VAE decode activations not modelled"]),
    ]


def load_cluster(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def report(cfg: Config, cluster: str | Path = CLUSTER_FILE) -> tuple[str, list[str]]:
    """The plan's table and its refusals (one line per role that does not fit): what `jobs/plan.py` and
    `jobs/distill.py --dry-run` print."""
    planned = plan(cfg, load_cluster(cluster))
    return format_plan(planned), planned.refusals()


def format_plan(p: Plan) -> str:
    """The table jobs/plan.py prints."""
    head = (f"{'role':9} {'n':>3} {'GPU':10} {'params':>8} {'states':>8} {'activ.':>8} {'other':>8} {'KV':>7} "
            f"{'transient':>9} {'total':>8} {'fits':>4} {'TFLOP/step':>10} {'s/step':>7}")
    lines = [f"{p.config}: per GPU, GB; activations with train.gradient_checkpointing={str(p.checkpointing).lower()} "
             f"('other': with it {'off' if p.checkpointing else 'on'}); time at {MFU:.0%} MFU of the dense bf16 peak", head]
    for r in p.roles:
        lines.append(
            f"{r.role:9} {r.count:>3} {r.gpu.name if r.gpu else '-':10} {r.params / 1e9:7.3f}B "
            f"{r.summed('states') / GB:8.1f} {r.summed('activations') / GB:8.1f} {r.summed('activations_other') / GB:8.1f} "
            f"{r.summed('kv_cache') / GB:7.1f} {r.summed('transient') / GB:9.1f} "
            f"{r.total / GB:8.1f} {'yes' if r.fits else 'NO':>4} {r.tflop_per_step:10.1f} {r.seconds_per_step:7.2f}")
    for r in p.roles:
        for note in r.notes:
            lines.append(f"  {r.role}: {note}")
        for part in (r, *r.inside):
            if part.deepspeed_estimate:
                lines.append(f"  {part.role}: model states {part.states / GB:.1f} GB = DeepSpeed's estimator "
                             f"{part.deepspeed_estimate / GB:.1f} GB + this project's EMA share and reduce buckets")
        if r.inside:
            lines.append(f"  {r.role}: total = every role's resident states + the largest turn's gradients, "
                         f"activations, KV and transient (the roles inside take turns within a step)")
    matching = ", ".join(f"{role} actors: {n}" for role, n in p.matching.items())
    verdict = "balanced" if p.balanced else "not balanced"
    lines.append(f"the step is bound by the {p.bound}; slowest/fastest role {p.spread:.2f} ({verdict}: within "
                 f"{BALANCED:g} counts as balanced); actors that would match the student's time: {matching}")
    return "\n".join(lines)
