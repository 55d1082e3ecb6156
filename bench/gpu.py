"""What only a GPU shows, in one prepared run: bf16 kernels, real speed and real memory, next to the
planner's predictions. About 5 minutes on one H200; run it whenever a GPU is lent, never in CI.

    python bench/gpu.py                               # CUDA: Wan 1.3B at 480x832, 21 latent frames
    python bench/gpu.py --device cpu --tiny           # the same code at toy size (the suite runs this)

1. The machine: GPU, torch and CUDA versions, NCCL, whether SDPA has its flash kernel for bf16.
2. Generation, a random-init Wan 1.3B causal student in bf16, one step per latent frame (framewise):
   first-block latency and steady ms per latent frame, fused and unfused cache writes, with and without
   the Wan VAE's streaming decode (random init, Wan's architecture). The authors' 1xH200 figures for
   their student: 102 ms first block, 117.8 ms per latent frame, 4.13 s a clip (VAE 1.62 s).
3. One distillation step on one GPU: student and critic in DeepSpeed engines (ZeRO-2, bf16, activation
   checkpointing), a 1.3B teacher as the 14B's stand-in (the 14B does not fit beside them), every role
   inside the one worker: seconds per step and peak memory, next to `pipeline.capacity`'s prediction
   for the same placement. The same step's memory is also split by role (each role's weights and
   states when it is built, and its turn: the peak inside the teacher's calls, the critic's calls, and
   the rest of the step, which is the student's), next to the planner's figures for the shipped
   placement, where each role has GPUs of its own.
Writes bench/results/gpu-<date>.json (or --out) and prints a section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
FULL = {"arch": "wan2.1-t2v-1.3b", "frames": 21, "height": 60, "width": 104, "text": 512, "steps": 3, "repeats": 3, "vae": {}}
TINY = {"arch": "tiny", "frames": 4, "height": 8, "width": 8, "text": 5, "steps": 2, "repeats": 2,
        "vae": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "latents_mean": [0.0] * 4,
                "latents_std": [1.0] * 4}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        facts |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())), "bf16": torch.cuda.is_bf16_supported()}
        try:  # a private-ish API: its signature has changed between torch versions
            from torch.backends.cuda import SDPAParams, can_use_flash_attention

            q = torch.randn(1, 12, 1560, 128, device=device, dtype=torch.bfloat16)
            facts["flash_sdpa_bf16"] = can_use_flash_attention(SDPAParams(q, q, q, None, 0.0, False, False))
        except (ImportError, TypeError, RuntimeError) as err:
            facts["flash_sdpa_bf16"] = f"unknown ({err})"
    return facts


def generation(device: torch.device, size: dict) -> dict:
    """Per variant: first block latency, then steady ms per latent frame (median of repeats)."""
    from diffusers import AutoencoderKLWan

    from pipeline.models.causal_wan import CausalWanModel
    from pipeline.models.codec import WanVAECodec
    from pipeline.models.wan_weights import WAN_CONFIGS, cast_like_from_pretrained
    from pipeline.rollout import inference_schedule, iter_blocks

    torch.manual_seed(0)
    student = cast_like_from_pretrained(CausalWanModel(**WAN_CONFIGS[size["arch"]]), torch.bfloat16).to(device).eval()
    channels = student.config.in_channels
    codec = WanVAECodec(AutoencoderKLWan(**size["vae"]).to(device, torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, channels, size["frames"], size["height"], size["width"], generator=g).to(device)
    text = torch.randn(1, size["text"], student.config.text_dim, generator=g).to(device, torch.bfloat16)
    steps = inference_schedule(size["frames"], [1000.0], "uniform")
    results = {}
    for fused in (False, True):
        for decode in (False, True):
            runs = []
            for _ in range(size["repeats"] + 1):  # the first is a warm-up
                stream = codec.stream_decoder() if decode else None
                marks = []
                sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    for block in iter_blocks(student, noise, text, steps, 1, fused=fused):
                        if stream is not None:
                            stream.decode(block)
                        sync(device)
                        marks.append(time.perf_counter() - start)
                runs.append(marks)
            runs = runs[1:]
            first = statistics.median(m[0] for m in runs)
            steady = statistics.median((m[-1] - m[0]) / (len(m) - 1) for m in runs)
            results[f"{'fused' if fused else 'unfused'}{' + VAE' if decode else ''}"] = {
                "first_block_ms": round(1000 * first, 1), "ms_per_latent_frame": round(1000 * steady, 1),
                "clip_s": round(statistics.median(m[-1] for m in runs), 3)}
    return results


class DeviceMemory:
    """What the device's allocator says: allocated bytes, the peak since the last reset. Reads 0 on a
    device without these statistics (the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def peak(self) -> int:
        sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


class TurnsByRole:
    """Each role's turn in a step where every role runs in this process: the device's peak memory
    above what was allocated when the role's part began. The teacher's and the critic's calls are
    theirs (measured from their start: on a GPU of their own, the student's activations are not
    there); the rest of the step is the student's (measured from the step's start)."""

    def __init__(self, memory) -> None:
        self.memory, self.turns = memory, collections.defaultdict(float)
        self.stack: list[tuple[str, int]] = []
        self.highest = 0  # the peak over every part: the device's own (each part resets its counter)

    def _close(self) -> None:
        """The running part's peak, as its role's turn (the largest so far), then a fresh peak."""
        peak = self.memory.peak()
        self.highest = max(self.highest, peak)
        if self.stack:
            role, base = self.stack[-1]
            self.turns[role] = max(self.turns[role], peak - base)
        self.memory.reset_peak()

    @contextlib.contextmanager
    def part(self, role: str, base: int | None = None):
        self._close()
        self.stack.append((role, self.memory.allocated() if base is None else base))
        try:
            yield
        finally:
            self._close()
            self.stack.pop()

    def wrap(self, inner, role: str, *methods: str):
        """`inner` with its `methods` counted as `role`'s parts (its other attributes as they are)."""
        turns = self

        class Counted:
            def __getattr__(self, name):
                value = getattr(inner, name)
                if name not in methods:
                    return value

                def counted(*args, **kwargs):
                    with turns.part(role):
                        return value(*args, **kwargs)
                return counted
        return Counted()


def on_device_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def distillation_step(device: torch.device, size: dict) -> dict:
    """s/step and peak memory of distill_step with every role in this process, and the planner's figure."""
    import torch.distributed as dist

    from pipeline import capacity
    from pipeline.config import load_config
    from pipeline.distill import Batch, LocalCritic, LocalTeacher, StepContext, distill_step
    from pipeline.engines import DeepSpeedOptimised
    from pipeline.models.loading import load_critic, load_student, load_teacher

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    arch = size["arch"]
    overrides = [f"model.{role}_{key}=" + ("''" if key == "path" else arch) for role in ("teacher", "student", "critic")
                 for key in ("path", "arch")] + [
        "model.student_init_path=''", "model.text_encoder_path=''", "model.codec=''",
        f"model.num_latent_frames={size['frames']}", f"model.latent_height={size['height']}",
        f"model.latent_width={size['width']}", "ray.num_workers=1", "train.batch_size=1", "ray.teacher_actors=0",
        "ray.critic_placement=trainer",
        "train.ema_start_step=0",  # the EMA is resident from its start step on: measure the steady state
        "method.gen_every=1", f"method.gradient_num_blocks={min(17, size['frames'])}",
    ]
    if not arch.startswith("wan"):
        overrides += ["method.discriminator.feature_layers=[0, 1]"]
    shipped = str(REPO / "configs" / "wan_1_3b_framewise.yaml")
    cfg = load_config(shipped, overrides)
    memory = DeviceMemory(device)
    turns = TurnsByRole(memory)
    built: dict[str, int] = {}  # what each role holds once built: weights, and for the trained ones their states

    def build(role: str, make):
        before = memory.allocated()
        made = make()
        built[role] = memory.allocated() - before
        return made

    student = build("student", lambda: DeepSpeedOptimised(
        load_student(cfg.model, device, checkpointing=cfg.train.gradient_checkpointing), cfg.train.lr, cfg, 1))
    critic = build("critic", lambda: DeepSpeedOptimised(load_critic(cfg, device), cfg.train.critic_lr, cfg, 1))
    teacher = build("teacher", lambda: load_teacher(cfg.model, device))
    g = torch.Generator().manual_seed(0)
    text_dim = student.module.config.text_dim
    negative = torch.randn(size["text"], text_dim, generator=g).to(device)
    ctx = StepContext(cfg, student, turns.wrap(LocalTeacher(teacher, negative, cfg.method.real_guidance), "teacher", "real_x0"),
                      turns.wrap(LocalCritic(critic, cfg.method), "critic", "feedback", "update"))
    shape = (1, student.module.config.in_channels, size["frames"], size["height"], size["width"])
    batch = Batch(ids=["0"], text=torch.randn(1, size["text"], text_dim, generator=g).to(device),
                  latent=torch.randn(shape, generator=g).to(device), indices=[0])
    memory.reset_peak()
    seconds = []
    for step in range(size["steps"]):
        sync(device)
        start = time.perf_counter()
        with turns.part("student", base=memory.allocated()):
            distill_step(ctx, batch, step)
        sync(device)
        seconds.append(time.perf_counter() - start)
    peak, resident = turns.highest, memory.allocated()  # resident: between steps, the model states
    cluster = capacity.load_cluster(REPO / "cluster.yaml")
    planned = capacity.plan(cfg, cluster)
    role = next(r for r in planned.roles if r.role == "student")  # teacher and critic merged into it
    # The shipped placement: each role on GPUs of its own (one each here, as this step's one sample).
    apart = capacity.plan(load_config(shipped, [
        *overrides, "ray.critic_placement=actors", "ray.critic_actors=1", "ray.teacher_actors=1"]), cluster)
    built["student"] += on_device_bytes(ctx.ema.shares) if ctx.ema is not None else 0
    by_role = {r.role: {"resident_gb": round(built[r.role] / 1e9, 2), "turn_gb": round(turns.turns[r.role] / 1e9, 2),
                        "predicted_resident_gb": round(r.resident / 1e9, 2), "predicted_turn_gb": round(r.turn / 1e9, 2)}
               for r in apart.roles if r.role in built}
    step = statistics.median(seconds[1:])
    result = {"s_per_step": round(step, 3), "peak_gb": round(peak / 1e9, 2), "resident_gb": round(resident / 1e9, 2),
              "predicted_gb": round(role.total / 1e9, 2),
              "predicted_resident_gb": round(role.resident / 1e9, 2),
              "predicted_turns_gb": {r.role: round(r.turn / 1e9, 2) for r in (role, *role.inside)},
              "predicted_tflop_per_step": float(f"{role.tflop_per_step:.4g}"),
              # The planner's FLOPs are torch's own count within 5% (tests/test_capacity.py, on the CPU:
              # counting on the H200 ran out of memory), checkpoint recomputation included.
              "achieved_tflops": round(role.tflop_per_step / step, 1), "by_role": by_role}
    dist.destroy_process_group()
    return result


def attempt(measure, device: torch.device, size: dict) -> dict:
    """The part's figures, or its error (traceback printed) so that the parts after it still run."""
    try:
        return measure(device, size)
    except Exception as err:  # noqa: BLE001 - recorded and reported, then the run exits 1
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}


def section(result: dict) -> str:
    m, lines = result["machine"], []
    lines.append(f"## On a GPU: `python bench/gpu.py` ({result['date']}, {m.get('gpu', m['device'])})")
    lines.append(f"torch {m['torch']}, CUDA {m.get('cuda', '-')}, NCCL {m.get('nccl', '-')}, "
                 f"flash SDPA for bf16: {m.get('flash_sdpa_bf16', '-')}\n")
    if "error" in result["generation"]:
        lines.append(f"Generation failed: {result['generation']['error']}")
    else:
        lines.append("| generation (Wan 1.3B arch, random init, bf16) | first block ms | ms / latent frame | clip s |")
        lines.append("|---|---|---|---|")
        for name, r in result["generation"].items():
            lines.append(f"| {name} | {r['first_block_ms']} | {r['ms_per_latent_frame']} | {r['clip_s']} |")
    d = result["distillation"]
    if "error" in d:
        lines.append(f"\nThe distillation step failed: {d['error']}")
        return "\n".join(lines)
    lines.append(f"\nOne distillation step, every role on one device: {d['s_per_step']} s/step; the planner's "
                 f"{d['predicted_tflop_per_step']} TFLOP a step (torch's count within 5%), so {d['achieved_tflops']} "
                 f"TFLOP/s achieved.\n")
    turns = ", ".join(f"{role} {gb}" for role, gb in d["predicted_turns_gb"].items())
    lines.append("| memory, GB | measured | planner |")
    lines.append("|---|---|---|")
    lines.append(f"| peak | {d['peak_gb']} | {d['predicted_gb']} |")
    lines.append(f"| between steps (weights, fp32 masters, Adam, EMA) | {d['resident_gb']} | {d['predicted_resident_gb']} |")
    lines.append(f"| peak - between steps | {round(d['peak_gb'] - d['resident_gb'], 2)} | "
                 f"{round(d['predicted_gb'] - d['predicted_resident_gb'], 2)} (the largest turn of: {turns}) |")
    lines.append("\nThe same step by role, against the planner's figures for the shipped placement (each role on its own GPUs):\n")
    lines.append("| role | built, GB | planner resident | turn, GB | planner turn |")
    lines.append("|---|---|---|---|---|")
    for name, r in d["by_role"].items():
        lines.append(f"| {name} | {r['resident_gb']} | {r['predicted_resident_gb']} | {r['turn_gb']} | {r['predicted_turn_gb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a check of the script, on any device)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    size = TINY if args.tiny else FULL
    date = datetime.date.today().isoformat()
    result = {"date": date, "size": size, "machine": machine(device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{date}{'-tiny' if args.tiny else ''}.json"
    for name, measure in (("generation", generation), ("distillation", distillation_step)):
        result[name] = attempt(measure, device, size)
        # Written after each part: a lent GPU's minutes are few, and a later failure must not lose them.
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(section(result))
    if any("error" in result[name] for name in ("generation", "distillation")):
        sys.exit(1)


if __name__ == "__main__":
    main()
