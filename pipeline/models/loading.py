"""Build each model role from the config: a path (local or s3://) loads real weights, an empty path
builds the named architecture with seeded random weights (tests and the toy world's students)."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from typing import TYPE_CHECKING

import fsspec
import torch

from pipeline.config import Config, ModelConfig
from pipeline.failures import about
from pipeline.models.wan_weights import WAN_CONFIGS, cast_like_from_pretrained, load_wan, locate_dit, to_diffusers_keys
from pipeline.storage import check_exists, is_local, load_pickled_tensors, naming

# The DiT and the critic (diffusers) and the text encoder (transformers) are imported where they are
# built (see pipeline/models/wan_weights.py): the checks on paths and headers need neither.
if TYPE_CHECKING:
    from pipeline.models.causal_wan import CausalWanModel
    from pipeline.models.discriminator import Critic
    from pipeline.models.text import TextEncoder

RANDOM_INIT_SEED = 0


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_teacher(cfg: ModelConfig, device: str | torch.device = "cpu") -> CausalWanModel:
    """The frozen teacher, in eval mode with gradients off."""
    from pipeline.models.causal_wan import CausalWanModel

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
    from pipeline.models.text import TextEncoder

    encoder = TextEncoder.from_pretrained(cfg.text_encoder_path, dtype=torch_dtype(cfg.dtype)) if cfg.text_encoder_path else TextEncoder.toy()
    return encoder.to(device)


def architecture_at(path: str, arch: str) -> dict:
    """The diffusers config of the DiT at `path` without loading its weights: from its config.json
    (either format), else the named built-in architecture `arch`."""
    source = locate_dit(path)
    if source.diffusers_dir is not None:
        fs, root = fsspec.core.url_to_fs(source.diffusers_dir)
        return json.loads(fs.cat(f"{root.rstrip('/')}/config.json"))
    return dict(source.config) if source.config is not None else dict(WAN_CONFIGS[arch])


def teacher_config(cfg: ModelConfig) -> dict:
    """The teacher's architecture (diffusers config dict) without loading its weights."""
    return architecture_at(cfg.teacher_path, cfg.teacher_arch) if cfg.teacher_path else dict(WAN_CONFIGS[cfg.teacher_arch])


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


def load_student(
    cfg: ModelConfig, device: str | torch.device = "cpu", for_ode_init: bool = False, checkpointing: bool = False
) -> CausalWanModel:
    """The trainable causal student in float32 (DeepSpeed casts for bf16 training), from
    `student_init_path` (ODE init) or `student_path` (distillation: the ODE-init export), a diffusers
    directory or a single file; when that is empty, from the teacher's weights. `checkpointing`
    (`train.gradient_checkpointing`): its blocks recompute in backward."""
    path = cfg.student_init_path if for_ode_init else cfg.student_path
    if path:
        with about("model.student_init_path" if for_ode_init else "model.student_path", path):
            model = load_wan(path, config=cfg.student_arch, dtype=torch.float32)
    else:
        model = _from_teacher(cfg, "student", cfg.student_arch)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(device).train().requires_grad_(True)


def load_critic(cfg: Config, device: str | torch.device = "cpu") -> Critic:
    """The critic: a bidirectional Wan trunk (`critic_path`, or the teacher's weights) and GAN heads
    with seeded random init, in float32; with `train.gradient_checkpointing`, both recompute in backward."""
    from pipeline.models.discriminator import Critic, build_gan_heads

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
    critic = Critic(trunk, heads, disc.feature_layers)
    if cfg.train.gradient_checkpointing:
        critic.enable_gradient_checkpointing()
    return critic.to(device).train().requires_grad_(True)


def student_architecture(cfg: ModelConfig, for_ode_init: bool = False) -> dict:
    """The student's diffusers config without loading weights: its path's config.json (either format),
    the named architecture for a training checkpoint, or the teacher's when the student starts from it."""
    path = cfg.student_init_path if for_ode_init else cfg.student_path
    return architecture_at(path, cfg.student_arch) if path else teacher_config(cfg)


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


def check_text_encoder(path: str, setting: str = "model.text_encoder_path") -> None:
    """The text encoder's layout (`text.text_encoder_layout`) from listings only, local or remote."""
    from pipeline.models.text import text_encoder_layout

    check_exists(path, setting)
    with naming(path, setting):
        fs, root = fsspec.core.url_to_fs(path)
        try:
            text_encoder_layout(fs, root)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{setting}={path}: {str(err).split(': ', 1)[-1]}") from None


def check_codec(spec: str, setting: str = "model.codec") -> None:
    """A codec spec: `patch:<p>`, or a Wan VAE's layout (`codec.vae_layout`) from small files only."""
    from pipeline.models.codec import vae_layout

    if spec.startswith("patch:"):
        return
    check_exists(spec, setting)
    with naming(spec, setting):
        fs, root = fsspec.core.url_to_fs(spec)
        if fs.isfile(f"{root.rstrip('/')}/codec.json"):  # a saved patch codec
            return
        try:
            vae_layout(fs, root)
        except ValueError as err:
            raise ValueError(f"{setting}={spec}: {str(err).split(': ', 1)[-1]}") from None


def check_model_paths(cfg: ModelConfig, keys: list[str]) -> None:
    """Every weight path among `keys` (teacher_path, student_init_path, student_path, critic_path,
    text_encoder_path, codec) checked for its layout and, for the DiTs, every tensor's shape: headers,
    config files and listings only, local or s3, before anything starts (and in `--dry-run`)."""
    for key in keys:
        if key in WEIGHTS_ARCH:
            check_weights(cfg, key)
        elif key == "text_encoder_path" and cfg.text_encoder_path:
            check_text_encoder(cfg.text_encoder_path)
        elif key == "codec" and cfg.codec:
            check_codec(cfg.codec)


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


def check_generation_inputs(checkpoint: str, cfg: ModelConfig) -> None:
    """What generating from `checkpoint` reads (jobs/generate.py, jobs/serve.py), for --dry-run: the
    checkpoint's layout and shapes, and the text encoder and codec it falls back to."""
    check_checkpoint(checkpoint, cfg.student_arch)
    check_model_paths(cfg, ["text_encoder_path", "codec"])


def check_weights_at(path: str, setting: str, arch: str, arch_setting: str) -> None:
    """`check_weights` for one path given as `setting`: its layout (`locate_dit`), then every tensor's
    shape (safetensors headers; a local .pt opened memory-mapped) against its config.json, or against
    `arch` (the value of `arch_setting`) where no config.json is beside the weights."""
    check_exists(path, setting)
    with naming(path, setting):
        try:
            source = locate_dit(path)
        except ValueError as err:
            raise ValueError(f"{setting}={err}") from None
        fs = fsspec.core.url_to_fs(path)[0]
        if source.diffusers_dir is not None:
            root = fsspec.core.url_to_fs(source.diffusers_dir)[1].rstrip("/")
            config = json.loads(fs.cat(f"{root}/config.json"))
            shapes: dict[str, tuple[int, ...]] | None = {}
            for file in sorted(fs.glob(f"{root}/*.safetensors")):
                shapes.update(_safetensors_shapes(fs, file, setting, path))
            if shapes:  # (.bin weights: diffusers names their mismatches itself)
                problems = _mismatches(shapes, _expected_shapes(json.dumps(config, sort_keys=True)))
                if problems:
                    raise ValueError(f"{setting}={path}: config.json does not match the weights beside it: {problems}")
            return
        shapes = _source_shapes(fs, source, setting)
    if shapes is None:
        return
    if source.config is not None:
        problems = _mismatches(shapes, _expected_shapes(json.dumps(source.config, sort_keys=True)))
        if problems:
            raise ValueError(f"{setting}={path}: the weights do not match the config.json beside them: {problems}")
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
    from pipeline.models.causal_wan import CausalWanModel

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


def _source_shapes(fs, source, setting: str) -> dict[str, tuple[int, ...]] | None:
    """Shapes of every tensor of a release's files or a training checkpoint, in diffusers keys, as
    `read_state_dict` would load them; None when that needs whole files (a .pt that is remote or not in
    the zip format)."""
    raw: dict = {}
    for file in source.files:
        path = fsspec.core.url_to_fs(file)[1]
        if path.endswith(".safetensors"):
            raw.update(_safetensors_shapes(fs, path, setting, source.path))
            continue
        if not is_local(fs):
            return None
        try:
            loaded = load_pickled_tensors(path, name=file)
        except ValueError as err:  # code in the pickle: refused here, before anything starts
            raise ValueError(f"{setting}={err}") from None
        except Exception:  # noqa: BLE001 - an old-format or odd file: the full load reports it
            return None
        if not isinstance(loaded, dict):
            return None
        for name in ("generator_ema", "generator", "model", "state_dict"):
            if isinstance(loaded.get(name), dict):
                loaded = loaded[name]
                break
        raw.update({k: tuple(v.shape) for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return to_diffusers_keys(raw)


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
