"""Wan weights in and out: named configs, the original-Wan <-> diffusers key map, and loading.

Layouts accepted by `load_wan` (local path or any fsspec URL such as s3://):
- a diffusers directory (config.json + safetensors), e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer;
- a single file, `.safetensors` or `.pt`/`.pth`, in the original Wan layout (Wan2.1's own release) or in
  the diffusers layout, optionally wrapped the way Self-Forcing / One-Forcing save theirs
  (`{"generator": ..., "generator_ema": ...}`, keys prefixed `model.` / `generator.` / `module.`).
"""

from __future__ import annotations

import re
from typing import Any

import fsspec
import torch
from safetensors.torch import load_file

from pipeline.models.causal_wan import CausalWanModel
from pipeline.storage import node_cache

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

# Module renames, original Wan -> diffusers. Block-level names are relative to `blocks.N.`.
# Original Wan's `norm3` is the (affine) cross-attention norm, diffusers calls it `norm2`; the original
# `norm2` (pre-FFN) has no parameters, so only the one rename is needed.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_BLOCK = {
    "modulation": "scale_shift_table",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    **{f"{src}.{a}": f"{dst}.{b}" for src, dst in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.+)$")
_WRAPPER_PREFIXES = ("model.diffusion_model.", "generator.", "model.", "module.", "_orig_mod.")


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str:
    match = _BLOCK_KEY.match(key)
    prefix, rest, table = (match.group(1), match.group(2), block) if match else ("", key, top)
    if rest in table:  # a bare parameter (modulation / scale_shift_table)
        return prefix + table[rest]
    module, _, leaf = rest.rpartition(".")
    if module not in table:
        raise KeyError(f"no Wan key mapping for '{key}'")
    return f"{prefix}{table[module]}.{leaf}"


def original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.1 keys (`blocks.0.self_attn.q.weight`) -> diffusers keys (`blocks.0.attn1.to_q.weight`)."""
    return {_rename(k, _TOP_LEVEL, _BLOCK): v for k, v in state_dict.items()}


def diffusers_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `original_to_diffusers`."""
    top = {v: k for k, v in _TOP_LEVEL.items()}
    block = {v: k for k, v in _BLOCK.items()}
    return {_rename(k, top, block): v for k, v in state_dict.items()}


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop training-wrapper prefixes (`model.`, `generator.`, `module.`, ...) shared by every key."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def is_original_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("text_embedding.", "time_embedding.", "head.")) for k in state_dict)


def read_state_dict(path: str, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` / `.pt` file (local or fsspec URL), in diffusers key layout.

    `entry` picks a sub-dict of a training checkpoint (e.g. "generator_ema"); by default the first of
    generator_ema, generator, model, state_dict that is present, else the file's top level.
    """
    local = node_cache(path)
    if local.endswith(".safetensors"):
        raw = load_file(local)
    else:
        raw = torch.load(local, map_location="cpu", weights_only=True)
    if entry is not None:
        if entry not in raw:
            raise KeyError(f"{path}: no entry '{entry}' (has: {sorted(raw)[:8]})")
        raw = raw[entry]
    else:
        for name in ("generator_ema", "generator", "model", "state_dict"):
            if isinstance(raw.get(name), dict):
                raw = raw[name]
                break
    state_dict = strip_wrapper_prefixes({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})
    return original_to_diffusers(state_dict) if is_original_layout(state_dict) else state_dict


def load_wan(
    path: str, config: str | dict[str, Any] | None = None, entry: str | None = None, dtype: torch.dtype = torch.float32
) -> CausalWanModel:
    """A `CausalWanModel` from a diffusers directory or a single checkpoint file (local or fsspec URL).

    A directory carries its own config; a single file needs `config` (a name in `WAN_CONFIGS` or a dict).
    Every missing, unexpected or mis-shaped key is named in the error. Both layouts cast to `dtype` the
    same way: diffusers' `_keep_in_fp32_modules` (RoPE, time embedder, norms, modulation) stay float32.
    """
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.isdir(fs_path):
        local = node_cache(path)
        return cast_like_from_pretrained(_own_memory(CausalWanModel.from_pretrained(local, torch_dtype=dtype)), dtype)
    if config is None:
        raise ValueError(f"{path}: a single weights file needs a model config (one of {sorted(WAN_CONFIGS)})")
    model = CausalWanModel(**(WAN_CONFIGS[config] if isinstance(config, str) else config))
    load_strict(model, read_state_dict(path, entry), source=path)
    return cast_like_from_pretrained(model, dtype)


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
    model.load_state_dict(state_dict, strict=True)
