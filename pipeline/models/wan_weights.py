"""Wan DiT weights in: named configs, the layouts of the official releases, and loading.

`locate_dit(path)` says what a path (local or any fsspec URL such as s3://) holds, reading only small
files (config.json, an index); `load_wan` then loads it. Layouts:
- a Diffusers folder (config.json of WanTransformer3DModel + one or sharded safetensors), e.g.
  Wan2.1-T2V-14B-Diffusers/transformer, or the repository root around it (its transformer/ is used);
- a Wan2.1 original release folder: config.json in Wan's own format (`"_class_name": "WanModel"`, `dim`,
  `num_heads`, ...) with `diffusion_pytorch_model.safetensors` (1.3B) or the shards that
  `diffusion_pytorch_model.safetensors.index.json` lists (14B); the index file itself names the same;
- a single weights file, `.safetensors` or `.pt`/`.pth`: a release's file (its config.json beside it
  names the architecture) or a training checkpoint such as Self-Forcing's / One-Forcing's
  (`{"generator": ..., "generator_ema": ...}`, keys prefixed `model.` and, from FSDP,
  `_fsdp_wrapped_module.` / `_checkpoint_wrapped_module.`), which needs `model.*_arch`.
Original Wan keys are converted with diffusers' own `convert_wan_transformer_to_diffusers`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from safetensors.torch import load_file

from pipeline.storage import load_pickled_tensors, node_cache

# diffusers (through the model) is imported where a model is built or original keys converted: the
# configs, layouts and header checks here serve processes that never build one (a job's checks before
# it starts, text-encoder actors), and diffusers costs them seconds each.
if TYPE_CHECKING:
    from pipeline.models.causal_wan import CausalWanModel

# diffusers WanTransformer3DModel configs of the released T2V models, and the tiny ones used in tests.
WAN_CONFIGS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ),
    "wan2.1-t2v-14b": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ),
    # ~2.4M parameters: the toy world's teacher, student and critic (48-channel patch-codec latents).
    "toy": dict(
        patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ),
    # The toy's geometry at test size (~40K parameters): job tests.
    "toy-debug": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ),
    # ~24K parameters: unit tests.
    "tiny": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ),
}

_WRAPPER_PREFIXES = ("model.diffusion_model.", "generator.", "model.", "module.", "_orig_mod.")
# Inserted inside keys by torch's FSDP and activation-checkpoint wrappers (at any depth).
_WRAPPER_INFIXES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop FSDP / checkpoint wrapper names anywhere in a key, then training-wrapper prefixes (`model.`,
    `generator.`, `module.`, ...) shared by every key."""
    state_dict = {_WRAPPER_INFIXES.sub("", k): v for k, v in state_dict.items()}
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def is_original_layout(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith(("text_embedding.", "time_embedding.", "head.")) for k in state_dict)


def to_diffusers_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Unwrapped keys in the diffusers layout: original Wan keys go through diffusers' converter (values
    are moved, never read, so tensors and shapes alike)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state_dict = strip_wrapper_prefixes(state_dict)
    if not is_original_layout(state_dict):
        return state_dict
    return convert_wan_transformer_to_diffusers(copy.copy(state_dict))  # it pops from its argument


def original_config_to_diffusers(config: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Wan's own config.json (`WanModel`: dim, num_heads, in_dim, ...) as WanTransformer3DModel's."""
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(f"{source}: a '{config['model_type']}' Wan model; only text-to-video (t2v) models are supported")
    dim, heads = int(config["dim"]), int(config["num_heads"])
    return dict(
        patch_size=tuple(config.get("patch_size", (1, 2, 2))), num_attention_heads=heads, attention_head_dim=dim // heads,
        in_channels=int(config["in_dim"]), out_channels=int(config["out_dim"]), text_dim=int(config.get("text_dim", 4096)),
        freq_dim=int(config["freq_dim"]), ffn_dim=int(config["ffn_dim"]), num_layers=int(config["num_layers"]),
        cross_attn_norm=bool(config.get("cross_attn_norm", True)),
        qk_norm="rms_norm_across_heads" if config.get("qk_norm", True) else None, eps=float(config["eps"]),
    )


def is_original_config(config: dict[str, Any]) -> bool:
    return config.get("_class_name") == "WanModel" or {"dim", "num_heads", "in_dim"} <= set(config)


def is_diffusers_config(config: dict[str, Any]) -> bool:
    return config.get("_class_name") in ("WanTransformer3DModel", "CausalWanModel") or {"num_attention_heads", "attention_head_dim"} <= set(config)


@dataclass
class DiTSource:
    """What a DiT path holds: a Diffusers folder to `from_pretrained`, or weight files (one, or the
    shards of an index) with the architecture their config.json gives (None: the config's *_arch)."""

    path: str
    diffusers_dir: str | None = None
    files: tuple[str, ...] = ()
    config: dict[str, Any] | None = None


def _read_json(fs, path: str) -> dict[str, Any] | None:
    return json.loads(fs.cat(path)) if fs.isfile(path) else None


def _join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def _index_files(fs, index_path: str, url_dir: str) -> tuple[str, ...]:
    index = json.loads(fs.cat(index_path))
    return tuple(_join(url_dir, name) for name in sorted(set(index["weight_map"].values())))


def locate_dit(url: str) -> DiTSource:
    """Which layout `url` is (see the module doc), from small files only; raises one line naming the
    path and what was expected when it is none of them."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or directory")
    if fs.isdir(path):
        if fs.isdir(f"{path}/transformer"):  # a Diffusers repository root
            return locate_dit(_join(url, "transformer"))
        config = _read_json(fs, f"{path}/config.json")
        if config is not None and is_diffusers_config(config):
            return DiTSource(url, diffusers_dir=url)
        indexes = sorted(fs.glob(f"{path}/*.safetensors.index.json"))
        if indexes:
            files = _index_files(fs, indexes[0], url)
        else:
            files = tuple(_join(url, p.rsplit("/", 1)[-1]) for p in sorted(fs.glob(f"{path}/diffusion_pytorch_model*.safetensors")))
        if config is None or not is_original_config(config) or not files:
            raise ValueError(
                f"{url}: not a Wan DiT folder: expected a Diffusers config.json (WanTransformer3DModel) or Wan's "
                "original config.json (\"_class_name\": \"WanModel\") with diffusion_pytorch_model*.safetensors"
            )
        return DiTSource(url, files=files, config=original_config_to_diffusers(config, url))
    parent_url, parent = url.rstrip("/").rsplit("/", 1)[0], path.rsplit("/", 1)[0]
    sibling = _read_json(fs, f"{parent}/config.json") if "/" in path else None
    config = None
    if sibling is not None and is_original_config(sibling):
        config = original_config_to_diffusers(sibling, url)
    elif sibling is not None and is_diffusers_config(sibling):
        config = {k: v for k, v in sibling.items() if not k.startswith("_")}
    if path.endswith(".index.json"):
        return DiTSource(url, files=_index_files(fs, path, parent_url), config=config)
    if not path.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{url}: not a weights file (.safetensors, .pt, .pth) nor a Wan DiT folder")
    return DiTSource(url, files=(url,), config=config)


def _load_file(url: str) -> dict[str, Any]:
    local = node_cache(url)
    if local.endswith(".safetensors"):
        return load_file(local)
    return load_pickled_tensors(local, name=url)


def read_state_dict(url: str, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a DiT path (a single file, an index's shards, or an original release folder), in the
    diffusers key layout. `entry` picks a sub-dict of a training checkpoint (e.g. "generator_ema"); by
    default the first of generator_ema, generator, model, state_dict that is present, else the top level."""
    raw: dict[str, Any] = {}
    for file in locate_dit(url).files:
        raw.update(_load_file(file))
    if entry is not None:
        if entry not in raw:
            raise KeyError(f"{url}: no entry '{entry}' (has: {sorted(raw)[:8]})")
        raw = raw[entry]
    else:
        for name in ("generator_ema", "generator", "model", "state_dict"):
            if isinstance(raw.get(name), dict):
                raw = raw[name]
                break
    return to_diffusers_keys({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})


def load_wan(
    path: str, config: str | dict[str, Any] | None = None, entry: str | None = None, dtype: torch.dtype = torch.float32
) -> CausalWanModel:
    """A `CausalWanModel` from any layout of `locate_dit` (local or fsspec URL, read through the node cache).

    A folder or a release file carries its config; a training checkpoint needs `config` (a name in
    `WAN_CONFIGS` or a dict). Every missing, unexpected or mis-shaped key is named in the error. The
    model is built without initialising weights (a 14B model is not drawn at random first) and cast as
    diffusers' from_pretrained casts: `_keep_in_fp32_modules` (RoPE, time embedder, norms, modulation)
    stay float32.
    """
    from pipeline.models.causal_wan import CausalWanModel

    source = locate_dit(path)
    if source.diffusers_dir is not None:
        local = node_cache(source.diffusers_dir)
        return cast_like_from_pretrained(_own_memory(CausalWanModel.from_pretrained(local, torch_dtype=dtype)), dtype)
    if source.config is not None:
        architecture = source.config
    elif config is None:
        raise ValueError(f"{path}: a single weights file needs a model config (one of {sorted(WAN_CONFIGS)})")
    else:
        architecture = WAN_CONFIGS[config] if isinstance(config, str) else config
    model = empty_wan(architecture)
    load_strict(model, read_state_dict(path, entry), source=path)
    return cast_like_from_pretrained(_own_memory(model), dtype)


def empty_wan(architecture: dict[str, Any]) -> CausalWanModel:
    """The model with its parameters on the meta device (no memory, no init) and its buffers (RoPE
    tables) real: `load_strict` assigns the loaded tensors."""
    from accelerate import init_empty_weights

    from pipeline.models.causal_wan import CausalWanModel

    with init_empty_weights(include_buffers=False):
        return CausalWanModel(**architecture)


def cast_like_from_pretrained(model: CausalWanModel, dtype: torch.dtype) -> CausalWanModel:
    """Cast floating tensors to `dtype` except those of the class's `_keep_in_fp32_modules`, with the rule
    diffusers' from_pretrained applies (a module name equal to one dotted component of the tensor name),
    and declare `dtype` the model's compute dtype. `model.to(dtype)` would cast the kept modules too,
    and logs a warning for every dtype, float32 included."""
    keep = set(type(model)._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    model.compute_dtype = dtype
    return model


def _own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Copy each parameter out of the memory-mapped safetensors file diffusers loads it from. Tensors in
    the map sit at 8-byte offsets, and CPU kernels take other (not bit-equal) paths on unaligned data:
    without the copy a reloaded model's outputs differ from the saved model's in the last bits, and no
    longer depend on the weights alone. The copy also frees the file (a temporary download) at once."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [
        f"shape {k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"{source}: weights do not match the model: {shown}")
    model.load_state_dict(state_dict, strict=True, assign=True)
