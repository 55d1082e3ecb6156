"""Tiny fakes of the official Wan2.1 downloads, for tests that check the product loads each layout.

Every fake has the release's file names, key names and dtypes, but random weights and tiny widths, and
is built in code from diffusers / transformers classes (nothing is downloaded). Layouts:

1. Wan2.1 original DiT release folder (`Wan2.1-T2V-1.3B/`, `Wan2.1-T2V-14B/`): `config.json` in Wan's
   own format (`"_class_name": "WanModel"`, `dim`, `num_heads`, ...) and the weights in Wan's key names,
   either one `diffusion_pytorch_model.safetensors` (1.3B) or six shards
   `diffusion_pytorch_model-0000N-of-00006.safetensors` plus `diffusion_pytorch_model.safetensors.index.json`
   (14B) -> `build_original_dit`, `build_sharded_original_dit`.
2. Wan's own umT5 text encoder: `models_t5_umt5-xxl-enc-bf16.pth` (a plain bfloat16 state dict in Wan's
   module names) with the tokenizer folder `google/umt5-xxl/` beside it -> `build_wan_t5`.
3. Wan's own VAE: `Wan2.1_VAE.pth` (a plain state dict in Wan's module names) -> `build_wan_vae`.
4. The Diffusers repository (`Wan2.1-T2V-1.3B-Diffusers/`): `model_index.json`, a sharded `transformer/`,
   `text_encoder/`, `tokenizer/`, `vae/`, `scheduler/` -> `build_diffusers_release`.
5. Self-Forcing / One-Forcing training checkpoints (`.pt`): `{"generator", "generator_ema", "critic"}`
   holding Wan key names under `model.`, optionally with FSDP's wrapper names inside the keys
   -> `build_training_checkpoint`.

The original-name fakes are right by construction: each builder maps diffusers' names to Wan's with an
inverse written here, then asserts that diffusers' own converter maps the result back exactly.
`tiny_dit`, `tiny_umt5`, `tiny_vae` make source models; builders write into the folder they are given
(created if missing), so calling the DiT, T5 and VAE builders on one folder gives a whole Wan2.1 release.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from pipeline.models.text import build_toy_tokenizer
from pipeline.models.wan_weights import WAN_CONFIGS

StateDict = dict[str, torch.Tensor]

# File names exactly as the releases spell them.
DIT_CONFIG = "config.json"
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SHARDS = 6  # the 14B release's shard count
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = Path("google", "umt5-xxl")
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_TEXT_DIM = 4096  # the original WanModel's default text_dim: its config.json only states other values


@dataclass(frozen=True)
class DitRelease:
    """An original-format DiT folder: its config, its weight file(s) in order, and the index if sharded."""

    folder: Path
    config: Path
    weights: list[Path]
    index: Path | None


@dataclass(frozen=True)
class WanT5Release:
    """Wan's umT5 file, the tokenizer folder beside it, and the transformers model it was made from
    (float32; the file holds the same weights rounded to bfloat16)."""

    pth: Path
    tokenizer: Path
    encoder: UMT5EncoderModel


@dataclass(frozen=True)
class WanVAERelease:
    """Wan's VAE file and the diffusers model it was made from (same float32 weights)."""

    pth: Path
    vae: AutoencoderKLWan


# ---------------------------------------------------------------------------------------------------
# Source models: seeded without disturbing the global RNG, so tests stay independent of each other.


def _seeded(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_dit(seed: int = 0, config: str = "tiny") -> WanTransformer3DModel:
    """A diffusers Wan DiT with the repository's named (tiny) config."""
    return _seeded(seed, lambda: WanTransformer3DModel(**WAN_CONFIGS[config]).eval())


def tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    """A tiny umT5 encoder shaped like Wan's (gated-GELU feed-forward, a position table per block,
    Wan's fixed relative-position maximum distance of 128)."""
    config = UMT5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: UMT5EncoderModel(config).eval())


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """A diffusers Wan VAE with tiny widths. Only base_dim may shrink: diffusers' converter hard-codes
    the default structure (z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2)."""
    return _seeded(seed, lambda: AutoencoderKLWan(base_dim=8).eval())


# ---------------------------------------------------------------------------------------------------
# Layout 1: the original DiT.

# Whole-key prefixes outside the blocks, diffusers -> Wan.
_DIT_TOP = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
    "patch_embedding.": "patch_embedding.",
}
# Inside a block, diffusers module path -> Wan module path. Wan's norm3 is the cross-attention norm,
# which diffusers calls norm2 (and the reverse); norm1/norm3 of diffusers carry no weights in T2V.
_DIT_BLOCK = {
    "attn1": "self_attn", "attn2": "cross_attn",
    "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
    "norm_q": "norm_q", "norm_k": "norm_k",
    "norm1": "norm1", "norm2": "norm3", "norm3": "norm2",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_DIT_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def _block_module(path: str) -> str:
    """A block's module path in Wan's names: 'attn1.to_q' -> 'self_attn.q', 'ffn.net.2' -> 'ffn.2'."""
    if path in _DIT_BLOCK:
        return _DIT_BLOCK[path]
    head, _, tail = path.partition(".")
    if head in _DIT_BLOCK and tail in _DIT_BLOCK:
        return f"{_DIT_BLOCK[head]}.{_DIT_BLOCK[tail]}"
    raise KeyError(f"no Wan name for block module {path!r}")


def _original_dit_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    block = re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", key)
    if block:
        return f"blocks.{block[1]}.modulation"
    block = _DIT_BLOCK_KEY.fullmatch(key)
    if block:
        return f"blocks.{block[1]}.{_block_module(block[2])}.{block[3]}"
    for prefix, original in _DIT_TOP.items():
        if key.startswith(prefix):
            return original + key[len(prefix):]
    raise KeyError(f"no Wan name for DiT key {key!r}")


def diffusers_dit_to_original(state_dict: StateDict) -> StateDict:
    """A diffusers WanTransformer3DModel state dict in the original Wan2.1 key names (same tensors)."""
    return {_original_dit_key(k): v for k, v in state_dict.items()}


def _assert_same(theirs: StateDict, ours: StateDict, what: str) -> None:
    assert set(theirs) == set(ours), f"{what}: keys differ: {sorted(set(theirs) ^ set(ours))[:5]}"
    for key, value in ours.items():
        assert theirs[key].shape == value.shape and torch.equal(theirs[key], value), f"{what}: {key} differs"


def _checked_original_dit(model: WanTransformer3DModel) -> StateDict:
    """The model's weights in Wan's names, verified against diffusers' converter (which pops from its
    input, hence the copy)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    original = diffusers_dit_to_original(state)
    _assert_same(convert_wan_transformer_to_diffusers(dict(original)), state, "DiT round trip")
    return original


def original_dit_config(config: Any) -> dict[str, Any]:
    """Wan's own config.json for a diffusers WanTransformer3DModel config. Wan's format cannot state a
    patch size, qk/cross-attention norm or image inputs, so those must be the T2V release's."""
    fixed = {"patch_size": (1, 2, 2), "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
             "image_dim": None, "added_kv_proj_dim": None}
    for name, value in fixed.items():
        if name in config and (tuple(config[name]) if name == "patch_size" else config[name]) != value:
            raise ValueError(f"Wan's original config cannot express {name}={config[name]!r}")
    out = {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0",
        "dim": config["num_attention_heads"] * config["attention_head_dim"], "eps": config["eps"],
        "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"], "in_dim": config["in_channels"],
        "model_type": "t2v", "num_heads": config["num_attention_heads"], "num_layers": config["num_layers"],
        "out_dim": config["out_channels"], "text_len": 512,
    }
    if config["text_dim"] != WAN_TEXT_DIM:
        out["text_dim"] = config["text_dim"]
    return out


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def _cast(state: StateDict, dtype: torch.dtype) -> StateDict:
    # Fresh contiguous tensors: safetensors refuses views and storage shared between keys.
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}


def build_original_dit(dest: Path, model: WanTransformer3DModel) -> DitRelease:
    """The 1.3B release's layout: config.json + one float32 diffusion_pytorch_model.safetensors."""
    dest.mkdir(parents=True, exist_ok=True)
    config = _write_json(dest / DIT_CONFIG, original_dit_config(model.config))
    weights = dest / DIT_WEIGHTS
    save_file(_cast(_checked_original_dit(model), torch.float32), weights, metadata={"format": "pt"})
    return DitRelease(dest, config, [weights], None)


def _split(keys: list[str], parts: int) -> list[list[str]]:
    """Consecutive, nearly equal runs of keys (in order), as a checkpoint sharder writes them."""
    if len(keys) < parts:
        raise ValueError(f"{len(keys)} keys cannot fill {parts} shards")
    size, extra = divmod(len(keys), parts)
    runs, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        runs.append(keys[start:end])
        start = end
    return runs


def build_sharded_original_dit(dest: Path, model: WanTransformer3DModel, shards: int = DIT_SHARDS) -> DitRelease:
    """The 14B release's layout: config.json, six shards and the index that maps each key to its shard.

    Tensors are bfloat16 here (float32 in the single file): a choice, so tests exercise both dtypes.
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = _write_json(dest / DIT_CONFIG, original_dit_config(model.config))
    state = _cast(_checked_original_dit(model), torch.bfloat16)
    weight_map, files = {}, []
    for i, keys in enumerate(_split(list(state), shards), start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in keys}, dest / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        files.append(dest / name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = _write_json(dest / DIT_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return DitRelease(dest, config, files, index)


# ---------------------------------------------------------------------------------------------------
# Layout 2: Wan's umT5 encoder.

# Inside encoder.block.{i}, transformers' name -> Wan's name in blocks.{i}. Wan's feed-forward is
# fc1(x) * gelu(gate(x)): transformers' wi_0 is the GELU branch, wi_1 the linear one.
_T5_BLOCK = {
    **{f"layer.0.SelfAttention.{x}.weight": f"attn.{x}.weight" for x in "qkvo"},
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
}


def _wan_t5_key(key: str) -> str | None:
    """Wan's name for a transformers UMT5EncoderModel key; None for the tied copy of the embedding."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.embed_tokens.weight":
        return None  # the same tensor as shared.weight; Wan stores it once
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    block = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if block and block[2] in _T5_BLOCK:
        return f"blocks.{block[1]}.{_T5_BLOCK[block[2]]}"
    raise KeyError(f"no Wan name for umT5 key {key!r}")


def umt5_to_wan_t5(state_dict: StateDict) -> StateDict:
    """A transformers UMT5EncoderModel state dict in Wan's T5 encoder names (same tensors)."""
    if "encoder.embed_tokens.weight" in state_dict and "shared.weight" in state_dict:
        assert torch.equal(state_dict["encoder.embed_tokens.weight"], state_dict["shared.weight"]), "untied embedding"
    out = {}
    for key, value in state_dict.items():
        wan = _wan_t5_key(key)
        if wan is not None:
            out[wan] = value
    return out


def build_wan_t5(
    dest: Path, encoder: UMT5EncoderModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> WanT5Release:
    """Wan's `models_t5_umt5-xxl-enc-bf16.pth` (bfloat16, a plain state dict) and `google/umt5-xxl/`.

    Defaults: the repository's toy tokenizer and a `tiny_umt5` sized to it.
    """
    tokenizer = tokenizer if tokenizer is not None else build_toy_tokenizer()
    encoder = encoder if encoder is not None else tiny_umt5(len(tokenizer))
    dest.mkdir(parents=True, exist_ok=True)
    pth = dest / WAN_T5_FILE
    torch.save(_cast(umt5_to_wan_t5(encoder.state_dict()), torch.bfloat16), pth)
    tokenizer_dir = dest / WAN_TOKENIZER_DIR
    tokenizer.save_pretrained(tokenizer_dir)
    return WanT5Release(pth, tokenizer_dir, encoder)


# ---------------------------------------------------------------------------------------------------
# Layout 3: Wan's VAE.

# A diffusers resnet's modules -> their index in Wan's `residual` Sequential (or its shortcut).
_VAE_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
               "conv_shortcut": "shortcut"}
# Modules named alike on both sides of the encoder / decoder, diffusers -> Wan.
_VAE_SIDE = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_VAE_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_RESNETS_PER_UP_BLOCK = 3  # num_res_blocks + 1; Wan flattens each up block and its upsampler into 4 entries


def _resnet(path: str) -> str:
    """'conv1.weight' -> 'residual.2.weight'; leaves resample / time_conv paths as they are."""
    head, _, tail = path.partition(".")
    return f"{_VAE_RESNET[head]}.{tail}" if head in _VAE_RESNET else path


def _original_vae_key(key: str) -> str:
    head, _, rest = key.partition(".")
    if head in _VAE_TOP:
        return f"{_VAE_TOP[head]}.{rest}"
    side = head  # encoder or decoder
    module, _, tail = rest.partition(".")
    if module in _VAE_SIDE:
        return f"{side}.{_VAE_SIDE[module]}.{tail}"
    mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest)
    if mid:  # Wan's middle is [resnet, attention, resnet]
        if mid[1] == "attentions":
            return f"{side}.middle.1.{mid[3]}"
        return f"{side}.middle.{2 * int(mid[2])}.{_resnet(mid[3])}"
    down = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if down and side == "encoder":  # same flat numbering, resnets and downsamplers alike
        return f"encoder.downsamples.{down[1]}.{_resnet(down[2])}"
    up = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", rest)
    if up and side == "decoder":
        first = (_RESNETS_PER_UP_BLOCK + 1) * int(up[1])
        if up[2] == "upsamplers":
            return f"decoder.upsamples.{first + _RESNETS_PER_UP_BLOCK}.{up[4]}"
        return f"decoder.upsamples.{first + int(up[3])}.{_resnet(up[4])}"
    raise KeyError(f"no Wan name for VAE key {key!r}")


def diffusers_vae_to_original(state_dict: StateDict) -> StateDict:
    """A diffusers AutoencoderKLWan state dict in the original Wan2.1 VAE key names (same tensors)."""
    return {_original_vae_key(k): v for k, v in state_dict.items()}


def build_wan_vae(dest: Path, vae: AutoencoderKLWan | None = None) -> WanVAERelease:
    """Wan's `Wan2.1_VAE.pth`: a plain float32 state dict in Wan's names (default source: `tiny_vae()`)."""
    vae = vae if vae is not None else tiny_vae()
    state = {k: v.detach() for k, v in vae.state_dict().items()}
    original = diffusers_vae_to_original(state)
    _assert_same(convert_wan_vae_to_diffusers(dict(original)), state, "VAE round trip")
    dest.mkdir(parents=True, exist_ok=True)
    pth = dest / WAN_VAE_FILE
    torch.save(_cast(original, torch.float32), pth)
    return WanVAERelease(pth, vae)


# ---------------------------------------------------------------------------------------------------
# Layout 4: the Diffusers repository.


def _plain_wan(model: WanTransformer3DModel) -> WanTransformer3DModel:
    """The same weights as a WanTransformer3DModel, so config.json says the release's class name even
    when the source is a subclass (e.g. the repository's CausalWanModel)."""
    if type(model) is WanTransformer3DModel:
        return model
    plain = WanTransformer3DModel.from_config(dict(model.config))
    plain.load_state_dict(model.state_dict())
    return plain


def build_diffusers_release(
    dest: Path,
    transformer: WanTransformer3DModel,
    text_encoder: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    vae: AutoencoderKLWan,
) -> Path:
    """`Wan2.1-T2V-*-Diffusers/`: model_index.json and one folder per component; returns `dest`.

    transformer/ is sharded (an index and several safetensors files), as in the 14B Diffusers repo.
    """
    dest.mkdir(parents=True, exist_ok=True)
    transformer = _plain_wan(transformer)
    size = sum(p.numel() * p.element_size() for p in transformer.state_dict().values())
    transformer.save_pretrained(dest / "transformer", max_shard_size=size // 3)  # -> about 3 shards
    assert (dest / "transformer" / DIT_INDEX).is_file(), "transformer/ did not shard"
    text_encoder.save_pretrained(dest / "text_encoder")
    tokenizer.save_pretrained(dest / "tokenizer")
    vae.save_pretrained(dest / "vae")
    # Wan's sampler settings; the product does not read them, they only complete the layout.
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        dest / "scheduler"
    )
    _write_json(dest / "model_index.json", {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.33.0.dev0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        # The release names T5TokenizerFast (a SentencePiece umT5 tokenizer); the toy word-level
        # tokenizer does not load as that class, so name the class that does load it.
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    })
    return dest


# ---------------------------------------------------------------------------------------------------
# Layout 5: Self-Forcing / One-Forcing training checkpoints.

_FSDP = "_fsdp_wrapped_module."
_CHECKPOINTED = "_checkpoint_wrapped_module."


def _fsdp_key(key: str) -> str:
    """Where FSDP (around the model and each block) and activation checkpointing (around each block)
    put their wrapper names: 'blocks.0.x' -> '_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.
    _checkpoint_wrapped_module.x'."""
    key = re.sub(r"^(blocks\.\d+\.)", rf"\g<1>{_FSDP}{_CHECKPOINTED}", key)
    return _FSDP + key


def training_state(model: WanTransformer3DModel, fsdp: bool = False, dtype: torch.dtype = torch.float32) -> StateDict:
    """One entry of a training checkpoint: Wan's names under Self-Forcing's wrapper prefix `model.`."""
    original = _cast(_checked_original_dit(model), dtype)
    return {"model." + (_fsdp_key(k) if fsdp else k): v for k, v in original.items()}


def build_training_checkpoint(
    dest: Path,
    model: WanTransformer3DModel,
    weights_entry: str = "generator_ema",
    critic: WanTransformer3DModel | None = None,
    fsdp: bool = False,
    dtype: torch.dtype = torch.float32,
    name: str = "model.pt",
) -> Path:
    """`torch.save({"generator": ..., "generator_ema": ..., ["critic": ...]})` at dest/name.

    `weights_entry` holds `model`'s weights; the other generator entry holds zeros of the same shapes,
    so a test can tell which one was loaded (a zero DiT outputs zeros).
    """
    decoys = {"generator", "generator_ema"} - {weights_entry}
    if len(decoys) != 1:
        raise ValueError(f"weights_entry must be 'generator' or 'generator_ema', not {weights_entry!r}")
    real = training_state(model, fsdp, dtype)
    zeros = {k: torch.zeros_like(v) for k, v in real.items()}
    checkpoint: dict[str, StateDict] = {weights_entry: real, decoys.pop(): zeros}
    if critic is not None:
        checkpoint["critic"] = training_state(critic, fsdp, dtype)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(dict(sorted(checkpoint.items())), dest / name)
    return dest / name
