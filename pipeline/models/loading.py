"""Build each model role from the config: a path (local or s3://) loads real weights, an empty path
builds the named architecture with seeded random weights (tests and the toy world's students)."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct

import fsspec
import torch

from pipeline.config import Config, ModelConfig
from pipeline.failures import about
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.discriminator import Critic, build_gan_heads
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import (
    WAN_CONFIGS, cast_like_from_pretrained, is_original_layout, load_wan, original_to_diffusers, strip_wrapper_prefixes,
)
from pipeline.storage import check_exists, is_local, naming

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
            model = cast_like_from_pretrained(CausalWanModel(**WAN_CONFIGS[cfg.teacher_arch]), dtype)
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


def _check_teacher_fits(cfg: ModelConfig, role: str, arch: str) -> None:
    if not _same_architecture(teacher_config(cfg), arch):
        raise ValueError(
            f"model.{role}_path is empty, so the {role} starts from the teacher's weights, but the teacher is not "
            f"a '{arch}' (model.{role}_arch): set model.{role}_path or model.{role}_arch"
        )


def _from_teacher(cfg: ModelConfig, role: str, arch: str) -> CausalWanModel:
    """A trainable role initialised from the teacher's weights (DMD2 / Self-Forcing), in float32."""
    _check_teacher_fits(cfg, role, arch)
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


# ---------------------------------------------------------------------------------------------------
# Driver-side checks: the weights fit the config, read from config.json and file headers only
# ---------------------------------------------------------------------------------------------------

WEIGHTS_ARCH = {"teacher_path": "teacher_arch", "student_init_path": "student_arch", "student_path": "student_arch", "critic_path": "critic_arch"}
_SAFETENSORS_MAX_HEADER = 100 * 2**20


def check_weights(cfg: ModelConfig, key: str) -> None:
    """Check `model.<key>` (teacher_path, student_init_path, student_path or critic_path) against the
    config on the driver, in about a second, before Ray and the MLflow run start: the path exists; a
    single weights file holds the tensors of `model.*_arch` (from the safetensors header, or a local .pt
    opened memory-mapped); a diffusers directory's config.json matches its own tensors' shapes; an
    empty student or critic path (start from the teacher) has the teacher's architecture. Raises one line
    naming the setting, the path and the mismatch. What it cannot see without reading the weights (a
    file cut short, a remote .pt) is left to the load."""
    arch_key = WEIGHTS_ARCH[key]
    path, arch = getattr(cfg, key), getattr(cfg, arch_key)
    if path:
        check_weights_at(path, f"model.{key}", arch, f"model.{arch_key}")
    elif key != "teacher_path":
        if cfg.teacher_path:
            check_weights_at(cfg.teacher_path, "model.teacher_path", cfg.teacher_arch, "model.teacher_arch")
        _check_teacher_fits(cfg, arch_key.removesuffix("_arch"), arch)


def check_checkpoint(checkpoint: str, student_arch: str) -> None:
    """`check_weights` for generation's --checkpoint: an export directory (diffusers pipeline layout,
    its transformer/ checked) or a single weights file read as `model.student_arch`."""
    check_exists(checkpoint, "--checkpoint")
    with naming(checkpoint, "--checkpoint"):
        fs, root = fsspec.core.url_to_fs(checkpoint)
        is_dir = fs.isdir(root)
        if is_dir and not fs.isdir(f"{root.rstrip('/')}/transformer"):
            raise FileNotFoundError(f"--checkpoint={checkpoint}: a directory needs a transformer/ folder (diffusers layout)")
    check_weights_at(f"{checkpoint.rstrip('/')}/transformer" if is_dir else checkpoint, "--checkpoint", student_arch, "model.student_arch")


def check_weights_at(path: str, setting: str, arch: str, arch_setting: str) -> None:
    """`check_weights` for one path given as `setting` (a directory carries its config; a single file
    is read as `arch`, the value of `arch_setting`)."""
    check_exists(path, setting)
    with naming(path, setting):
        fs, root = fsspec.core.url_to_fs(path)
        if fs.isdir(root):
            root = root.rstrip("/")
            if not fs.exists(f"{root}/config.json"):
                raise FileNotFoundError(f"{setting}={path}: a weights directory needs the diffusers layout (config.json + safetensors); no config.json")
            config = json.loads(fs.cat(f"{root}/config.json"))
            shapes: dict[str, tuple[int, ...]] = {}
            for file in sorted(fs.glob(f"{root}/*.safetensors")):
                shapes.update(_safetensors_shapes(fs, file, setting, path))
            if shapes:  # (.bin weights: diffusers names their mismatches itself)
                problems = _mismatches(shapes, _expected_shapes(json.dumps(config, sort_keys=True)))
                if problems:
                    raise ValueError(f"{setting}={path}: config.json does not match the weights beside it: {problems}")
            return
        shapes = _file_shapes(fs, root, path, setting)
    if shapes is None:
        return
    if arch not in WAN_CONFIGS:
        raise ValueError(f"{arch_setting}={arch}: not a known architecture (one of {sorted(WAN_CONFIGS)})")
    problems = _mismatches(shapes, _expected_shapes(json.dumps(WAN_CONFIGS[arch], sort_keys=True)))
    if problems:
        fits = [name for name, config in WAN_CONFIGS.items() if not _mismatches(shapes, _expected_shapes(json.dumps(config, sort_keys=True)))]
        hint = f"set {arch_setting}={fits[0]}" if fits else f"set {arch_setting} to their architecture (one of {sorted(WAN_CONFIGS)})"
        raise ValueError(f"{setting}={path}: the weights are not a '{arch}' ({arch_setting}): {problems}; {hint}")


@functools.lru_cache(maxsize=16)
def _expected_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict shape of a CausalWanModel with this config, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = CausalWanModel.from_config(json.loads(config_json))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _safetensors_shapes(fs, file: str, setting: str, path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte little-endian length, then JSON): a few KB read,
    local or remote."""
    with fs.open(file, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(size) if 0 < size <= _SAFETENSORS_MAX_HEADER else b""
    try:
        entries = json.loads(header)
    except ValueError:
        entries = None
    if not isinstance(entries, dict):
        raise ValueError(f"{setting}={path}: {file.rsplit('/', 1)[-1]} is not a safetensors file (unreadable header)")
    return {k: tuple(v["shape"]) for k, v in entries.items() if k != "__metadata__"}


def _file_shapes(fs, root: str, path: str, setting: str) -> dict[str, tuple[int, ...]] | None:
    """Shapes of a single weights file in diffusers keys, as `read_state_dict` would load it; None when
    that needs the whole file (a .pt that is remote or not in the zip format)."""
    if root.endswith(".safetensors"):
        raw: dict = _safetensors_shapes(fs, root, setting, path)
    elif is_local(fs):
        try:
            raw = torch.load(root, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # noqa: BLE001 - an old-format or odd file: the full load reports it
            return None
        if not isinstance(raw, dict):
            return None
        for name in ("generator_ema", "generator", "model", "state_dict"):
            if isinstance(raw.get(name), dict):
                raw = raw[name]
                break
        raw = {k: tuple(v.shape) for k, v in raw.items() if isinstance(v, torch.Tensor)}
    else:
        return None
    shapes = strip_wrapper_prefixes(raw)
    if is_original_layout(shapes):
        try:
            shapes = original_to_diffusers(shapes)
        except KeyError as err:
            raise ValueError(f"{setting}={path}: {err.args[0]}") from None
    return shapes


def _mismatches(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    """'' when the keys and shapes agree, else a short summary: counts with the first example of each."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in shapes if k in expected and tuple(shapes[k]) != expected[k]]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {list(shapes[k])} in the weights, {list(expected[k])} expected)")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return ", ".join(parts)
