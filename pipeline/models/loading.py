"""Build each model role from the config: a path (local or s3://) loads real weights, an empty path
builds the named architecture with seeded random weights (tests and the toy world's students)."""

from __future__ import annotations

import dataclasses
import json

import fsspec
import torch

from pipeline.config import Config, ModelConfig
from pipeline.failures import about
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.discriminator import Critic, build_gan_heads
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import WAN_CONFIGS, _cast_like_from_pretrained, load_wan

RANDOM_INIT_SEED = 0


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_teacher(cfg: ModelConfig, device: str | torch.device = "cpu") -> CausalWanModel:
    """The frozen teacher, in eval mode with gradients off."""
    dtype = torch_dtype(cfg.dtype)
    if cfg.teacher_path:
        with about("model.teacher_path", cfg.teacher_path):  # diffusers' load errors do not name the setting
            model = load_wan(cfg.teacher_path, config=cfg.teacher_arch, dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            # Cast as a loaded teacher is: `.to(dtype)` would cast the fp32-kept modules and warn.
            model = _cast_like_from_pretrained(CausalWanModel(**WAN_CONFIGS[cfg.teacher_arch]), dtype)
    return model.to(device).eval().requires_grad_(False)


def teacher_id(cfg: ModelConfig) -> str:
    """What produced a dataset's latents, recorded beside them."""
    return cfg.teacher_path or f"random:{cfg.teacher_arch}:{RANDOM_INIT_SEED}"


def load_text_encoder(cfg: ModelConfig, device: str | torch.device = "cpu") -> TextEncoder:
    """umT5 from `text_encoder_path` (a Wan checkout or a saved folder), or the toy world's encoder."""
    encoder = TextEncoder.from_pretrained(cfg.text_encoder_path, dtype=torch_dtype(cfg.dtype)) if cfg.text_encoder_path else TextEncoder.toy()
    return encoder.to(device)


def teacher_config(cfg: ModelConfig) -> dict:
    """The teacher's architecture (diffusers config dict) without loading its weights: from the
    directory's config.json, or the named built-in architecture."""
    if cfg.teacher_path:
        fs, path = fsspec.core.url_to_fs(cfg.teacher_path)
        if fs.isdir(path):
            return json.loads(fs.cat(f"{path.rstrip('/')}/config.json"))
    return dict(WAN_CONFIGS[cfg.teacher_arch])


def _same_architecture(config: dict, arch: str) -> bool:
    wanted = WAN_CONFIGS[arch]
    normal = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON lists vs tuples)
    return all(normal(config.get(key)) == normal(value) for key, value in wanted.items())


def _from_teacher(cfg: ModelConfig, role: str, arch: str) -> CausalWanModel:
    """A trainable role initialised from the teacher's weights (DMD2 / Self-Forcing), in float32."""
    if not _same_architecture(teacher_config(cfg), arch):
        raise ValueError(
            f"model.{role}_path is empty, so the {role} starts from the teacher's weights, but the teacher is not "
            f"a '{arch}' (model.{role}_arch): set model.{role}_path or model.{role}_arch"
        )
    teacher = load_teacher(dataclasses.replace(cfg, dtype="float32"))
    return teacher.train().requires_grad_(True)


def load_student(cfg: ModelConfig, device: str | torch.device = "cpu", for_ode_init: bool = False) -> CausalWanModel:
    """The trainable causal student in float32 (DeepSpeed casts for bf16 training), from
    `student_init_path` (ODE init) or `student_path` (distillation: the ODE-init export), a diffusers
    directory or a single file; when that is empty, from the teacher's weights."""
    path = cfg.student_init_path if for_ode_init else cfg.student_path
    if path:
        with about("model.student_init_path" if for_ode_init else "model.student_path", path):
            model = load_wan(path, config=cfg.student_arch, dtype=torch.float32)
    else:
        model = _from_teacher(cfg, "student", cfg.student_arch)
    return model.to(device).train().requires_grad_(True)


def load_critic(cfg: Config, device: str | torch.device = "cpu") -> Critic:
    """The critic: a bidirectional Wan trunk (`critic_path`, or the teacher's weights) and GAN heads
    with seeded random init, in float32."""
    m = cfg.model
    if m.critic_path:
        with about("model.critic_path", m.critic_path):
            trunk = load_wan(m.critic_path, config=m.critic_arch, dtype=torch.float32)
    else:
        trunk = _from_teacher(m, "critic", m.critic_arch)
    disc = cfg.method.discriminator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED + 1)
        heads = build_gan_heads(
            trunk, disc.feature_layers, num_registers=disc.num_registers, num_heads=disc.num_heads,
            ffn_dim=disc.ffn_dim, hidden_dim=disc.hidden_dim, timestep_conditioning=disc.timestep_conditioning,
        )
    return Critic(trunk, heads, disc.feature_layers).to(device).train().requires_grad_(True)


def student_architecture(cfg: ModelConfig, for_ode_init: bool = False) -> dict:
    """The student's diffusers config without loading weights: its directory's config.json, the named
    architecture for a single file, or the teacher's when the student starts from it."""
    path = cfg.student_init_path if for_ode_init else cfg.student_path
    if not path:
        return teacher_config(cfg)
    fs, fs_path = fsspec.core.url_to_fs(path)
    config_path = f"{fs_path.rstrip('/')}/config.json"
    if fs.isdir(fs_path) and fs.exists(config_path):
        return json.loads(fs.cat(config_path))
    return dict(WAN_CONFIGS[cfg.student_arch])
