"""Typed experiment config: dataclass defaults <- YAML file <- dotted CLI overrides.

Every section is a dataclass validated in `__post_init__`; unknown keys and wrong types are errors that
name the dotted key. `Config.to_dict()` is what MLflow logs as params and what `--dry-run` prints.

    cfg = load_config("configs/toy_framewise.yaml", ["train.lr=2e-6", "model.frames_per_block=3"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline.toyworld import WorldConfig


class ConfigError(ValueError):
    """A bad config value; the message names the dotted key."""


@dataclass
class ModelConfig:
    """The three Wan roles. Paths are diffusers directories or single files, local or s3://.

    `*_arch` names a built-in architecture (see pipeline.models.wan_weights.WAN_CONFIGS) used when a
    path is a single weights file or empty (random init: tests, the toy world).
    """

    teacher_path: str = ""
    teacher_arch: str = "tiny"
    student_init_path: str = ""  # where ODE init starts the student; empty = the teacher's weights
    student_path: str = ""  # where distillation starts it: the ODE-init export; empty = the teacher's weights
    student_arch: str = "tiny"
    critic_path: str = ""  # empty = start from the teacher's weights (as in DMD2 / Self-Forcing)
    critic_arch: str = "tiny"
    frames_per_block: int = 1  # 1 = framewise (the headline), 3 = chunkwise
    num_latent_frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    text_encoder_path: str = ""  # umT5 directory; empty = the toy text encoder
    codec: str = ""  # a Wan VAE directory, or "patch:4" for the toy codec
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _positive(self, "frames_per_block", "num_latent_frames", "latent_height", "latent_width")
        if self.num_latent_frames % self.frames_per_block:
            raise ConfigError(
                f"model.num_latent_frames={self.num_latent_frames} is not a multiple of "
                f"model.frames_per_block={self.frames_per_block}"
            )

    @property
    def num_blocks(self) -> int:
        return self.num_latent_frames // self.frames_per_block


@dataclass
class DiscriminatorConfig:
    """GAN heads on critic features (One-Forcing: taps after blocks 21 and 29 of 30, 0-based 20 and 28)."""

    feature_layers: list[int] = field(default_factory=lambda: [1])
    num_registers: int = 1
    num_heads: int = 2
    ffn_dim: int = 64
    hidden_dim: int | None = None  # the head's hidden width; None = the critic's width D, as the paper has it
    timestep_conditioning: bool = False

    def __post_init__(self) -> None:
        _positive(self, "num_registers", "num_heads", "ffn_dim")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ConfigError("method.discriminator.hidden_dim must be > 0 (or null: the critic's width)")
        if not self.feature_layers:
            raise ConfigError("method.discriminator.feature_layers must name at least one critic layer")


@dataclass
class MethodConfig:
    """One-Forcing: self-forcing rollouts, DMD with a CFG real score, and a GAN on critic features."""

    denoising_steps: list[int] = field(default_factory=lambda: [1000])  # training: one step per block
    warp_denoising_steps: bool = True  # map the list through the shift, as Self-Forcing does
    shift: float = 5.0
    gradient_num_blocks: int = 17  # blocks (from the end) whose generating forward carries grad
    same_exit_step_across_blocks: bool = True
    context_noise: float = 0.0  # timestep of the cache-writing pass on each clean block
    real_guidance: float = 5.0  # x0_real = x0_cond + g (x0_cond - x0_uncond)
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    gen_every: int = 5  # one generator update per this many critic updates
    gan_generator_weight: float = 0.03
    gan_discriminator_weight: float = 0.03
    gan_loss: Literal["nonsaturating", "relativistic"] = "nonsaturating"
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.1
    r2_sigma: float = 0.01
    inference_schedule: Literal["uniform", "first4then1"] = "uniform"
    negative_prompt: str = (
        "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
        "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
        "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
        "fused fingers, still picture, messy background, three legs, many people in the background, "
        "walking backwards"
    )
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        if not self.denoising_steps or sorted(self.denoising_steps, reverse=True) != self.denoising_steps:
            raise ConfigError(f"method.denoising_steps must be decreasing and non-empty, got {self.denoising_steps}")
        if not all(0 < t <= 1000 for t in self.denoising_steps):
            raise ConfigError(f"method.denoising_steps must lie in (0, 1000], got {self.denoising_steps}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ConfigError("method.min_timestep < method.max_timestep must lie in [0, 1000]")
        _positive(self, "gradient_num_blocks", "gen_every", "shift")


@dataclass
class DataConfig:
    prompts: str = ""  # prompt file, directory or glob (txt, jsonl, csv, parquet), local or s3://
    videos: str = ""  # captioned videos for real latents; empty = teacher ODE outputs play "real"
    output: str = ""  # Parquet dataset directory, local or s3://
    seed: int = 0
    max_prompt_chars: int = 2000
    teacher_steps: int = 50
    teacher_guidance: float = 5.0
    trajectory_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # warped like method's steps
    shard_rows: int = 256  # rows per Parquet shard: a killed run loses at most the shards in flight
    batch_rows: int = 4  # rows per actor call

    def __post_init__(self) -> None:
        _positive(self, "max_prompt_chars", "teacher_steps", "shard_rows", "batch_rows")
        if not all(0 < t <= 1000 for t in self.trajectory_steps):
            raise ConfigError(f"data.trajectory_steps must lie in (0, 1000], got {self.trajectory_steps}")
        if self.teacher_guidance < 0:
            raise ConfigError(f"data.teacher_guidance must be >= 0, got {self.teacher_guidance}")


@dataclass
class TrainConfig:
    lr: float = 1e-5
    critic_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    ema_start_step: int = 50
    steps: int = 200  # critic updates
    batch_size: int = 1  # per worker
    seed: int = 0
    zero_stage: Literal[0, 1, 2, 3] = 2
    checkpoint_every: int = 50
    log_every: int = 10
    storage_path: str = "~/oneforce_runs"  # local or s3://; a run lives in <storage_path>/<name>
    gradient_checkpointing: bool = False  # student (and ODE init) and critic recompute in backward: less memory, ~1/3 more time
    export_path: str = ""  # where the generation checkpoint goes; empty = <storage_path>/<name>/export
    max_failures: int = 0  # Ray Train restarts of the workers, each resuming from the last checkpoint
    checkpoints_to_keep: int = 2

    def __post_init__(self) -> None:
        _positive(self, "lr", "critic_lr", "steps", "batch_size", "checkpoint_every", "log_every", "checkpoints_to_keep")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must have two values, got {self.betas}")


@dataclass
class RayConfig:
    address: str = ""  # empty = start or join a local instance
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    teacher_actors: int = 1  # distillation: 0 = the teacher inside each Train worker (colocated)
    teacher_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    encoder_actors: int = 1  # text-encoder (and VAE-encoder) actor pool size, for preprocessing
    encoder_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    # The critic: "trainer" = its own DeepSpeed engine inside each Train worker; "actors" = a critic actor
    # group of `critic_actors` (each with `critic_resources`), one data-parallel DeepSpeed engine with its
    # own process group, fed the whole global batch by the Train workers.
    critic_placement: Literal["trainer", "actors"] = "trainer"
    critic_actors: int = 1
    critic_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})

    def __post_init__(self) -> None:
        _positive(self, "num_workers", "encoder_actors", "critic_actors")
        if self.teacher_actors < 0:
            raise ConfigError(f"ray.teacher_actors must be >= 0, got {self.teacher_actors}")


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # empty = sqlite:///./mlflow.db; "none" = no tracking
    experiment: str = "oneforce"
    run_name: str = ""
    sample_every: int = 50  # training: log sample videos of the student every this many steps; 0 = never
    sample_prompts: int = 4  # ... on this many fixed prompts of the dataset

    def __post_init__(self) -> None:
        for key in ("sample_every", "sample_prompts"):
            if getattr(self, key) < 0:
                raise ConfigError(f"tracking.{key} must be >= 0 (0 turns sample videos off), got {getattr(self, key)}")


@dataclass
class PretrainConfig:
    """Flow-matching pretraining of the toy teacher (jobs/pretrain_teacher.py). Uses model.teacher_arch,
    model.codec, model.text_encoder_path and the `world` section."""

    output: str = "runs/toy_teacher"
    steps: int = 10000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1  # share of captions replaced by the empty prompt
    timestep_shift: float = 3.0  # u ~ U[0, 1) -> shift(u): more steps at high noise, where layout is decided
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 50
    eval_every: int = 2000
    eval_prompts: int = 48
    sample_steps: int = 25
    sample_shift: float = 3.0
    guidance: float = 4.0
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "lr", "checkpoint_every", "log_every", "eval_every",
                  "eval_prompts", "sample_steps")
        if not 0 <= self.cfg_dropout < 1:
            raise ConfigError(f"pretrain.cfg_dropout must lie in [0, 1), got {self.cfg_dropout}")


@dataclass
class GenerateConfig:
    """Batch generation (jobs/generate.py). Steps, schedule and block size come from `method` and `model`."""

    fps: int = 16
    num_latent_frames: int = 0  # 0 = model.num_latent_frames; more makes long videos (see cache_window)
    cache_window: int = 0  # latent frames of KV context kept; 0 = all (a sliding window beyond it)
    sink_frames: int = 0  # of the window, the clip's first latent frames kept for good (attention sink)
    samples: int = 1  # clips per prompt unless the prompt file says
    seed: int = 0  # base seed unless the prompt file says; sample k uses seed + k
    actors: int = 1
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    max_prompt_chars: int = 2000

    def __post_init__(self) -> None:
        _positive(self, "fps", "samples", "actors", "max_prompt_chars")
        if self.num_latent_frames < 0 or self.cache_window < 0 or self.sink_frames < 0:
            raise ConfigError("generate.num_latent_frames, generate.cache_window and generate.sink_frames must be >= 0")
        if self.sink_frames and not self.sink_frames < self.cache_window:
            raise ConfigError(
                f"generate.sink_frames={self.sink_frames} needs generate.cache_window above it (the window holds the sink "
                f"and at least one recent frame), got cache_window={self.cache_window}"
            )


@dataclass
class ServeConfig:
    """The streaming server (jobs/serve.py): where it listens, its replicas and their limits. Per stream,
    generation uses the `generate` settings (cache_window and sink_frames a request may override)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise; reach it through an SSH tunnel or a proxy
    port: int = 8000
    num_replicas: int = 1
    max_replicas: int = 0  # above num_replicas: autoscale between them on ongoing streams
    upscale_delay_s: float = 30.0  # Serve's defaults: how long streams must wait before a replica is added,
    downscale_delay_s: float = 600.0  # and how long one must stay idle before it is removed
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    max_queued_streams: int = 2  # per replica, waiting for it; one more is answered 503 at once
    max_blocks: int = 256  # the longest stream, in blocks; past the clip it needs a cache window
    max_streams_per_client: int = 4  # created and not finished, per client address
    jpeg_quality: int = 90
    auth_env: str = "ONEFORCE_SERVE_TOKEN"  # holds a bearer token; when set, /v1 wants "Authorization: Bearer <it>"
    log_to_mlflow: bool = False  # each stream's first-frame latency and frames/s, one MLflow run per replica

    def __post_init__(self) -> None:
        _positive(self, "port", "num_replicas", "max_queued_streams", "max_blocks", "max_streams_per_client", "jpeg_quality")
        if self.max_replicas and self.max_replicas < self.num_replicas:
            raise ConfigError(f"serve.max_replicas={self.max_replicas} is below serve.num_replicas={self.num_replicas}")
        if self.jpeg_quality > 100:
            raise ConfigError(f"serve.jpeg_quality must be 1-100, got {self.jpeg_quality}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"serve.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if self.method.gradient_num_blocks > self.model.num_blocks:
            raise ConfigError(
                f"method.gradient_num_blocks={self.method.gradient_num_blocks} exceeds the clip's "
                f"{self.model.num_blocks} blocks (model.num_latent_frames / model.frames_per_block)"
            )
        disc_layers = self.method.discriminator.feature_layers
        if any(layer < 0 for layer in disc_layers):
            raise ConfigError(f"method.discriminator.feature_layers must be >= 0, got {disc_layers}")
        global_batch = self.ray.num_workers * self.train.batch_size
        if self.ray.critic_placement == "actors" and global_batch % self.ray.critic_actors:
            raise ConfigError(
                f"ray.critic_actors={self.ray.critic_actors} must divide the global batch ray.num_workers x "
                f"train.batch_size = {global_batch}: each critic actor trains on an equal share of it"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(
    path: str | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> Config:
    """Defaults <- `base` (dotted keys, e.g. the settings an exported checkpoint was trained with) <-
    YAML at `path` <- `overrides` ("section.key=value", values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for key, value in (base or {}).items():
        _set_dotted(tree, key, value)
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _merge(tree, loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return build(Config, tree)


def build(cls: type, tree: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in tree.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(arg, v, f"{key}[{i}]") for i, (arg, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if hint is type(None) and value is None:
        return None
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    """`update` into `tree`, section by section (a section in `update` replaces only the keys it names)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[leaf] = value


def _positive(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{_SECTION_NAMES[type(section).__name__]}.{name} must be > 0")


_SECTION_NAMES = {
    "ModelConfig": "model", "MethodConfig": "method", "DiscriminatorConfig": "method.discriminator",
    "TrainConfig": "train", "RayConfig": "ray", "TrackingConfig": "tracking", "DataConfig": "data",
    "PretrainConfig": "pretrain", "GenerateConfig": "generate", "ServeConfig": "serve",
}
