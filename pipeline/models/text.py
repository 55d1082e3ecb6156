"""Text conditioning: prompts -> (B, max_length, dim) embeddings, the way Wan conditions on umT5.

Wan encodes a prompt with umT5-XXL, keeps the hidden states of the real tokens (eos included) and pads
with zeros to 512 tokens (`WanPipeline._get_t5_prompt_embeds` in diffusers). The toy world does the
same with the same classes: a word-level `PreTrainedTokenizerFast` over `toyworld.vocabulary()` and a
tiny randomly initialised `UMT5EncoderModel`. Saving and loading go through `save_pretrained` /
`from_pretrained`, so a directory holding the real umT5 (e.g. a Wan diffusers checkout, with its
`tokenizer/` and `text_encoder/` folders) loads through the very same path.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import fsspec
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from pipeline import toyworld
from pipeline.storage import load_pickled_tensors, node_cache

# T5's special-token ids: padding 0, end of sequence 1, unknown 2.
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
WAN_MAX_LENGTH = 512  # Wan's text_len, used when a tokenizer does not state a sensible maximum


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning (diffusers `pipeline_wan.prompt_clean`, without the optional ftfy pass)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def build_toy_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy grammar's words, with T5's special tokens and an eos appended.

    Lower-casing plus whitespace and punctuation splitting means "Red square," gives [red, square, ","];
    words outside the grammar become <unk> instead of failing, so stray prompts still encode.
    """
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in toyworld.vocabulary():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def build_toy_encoder(
    vocab_size: int, dim: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> UMT5EncoderModel:
    """A tiny umT5 encoder, randomly initialised from `seed` without disturbing the global RNG."""
    if dim % heads:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}")
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=dim,
        d_kv=dim // heads,
        d_ff=2 * dim,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # umT5's feed-forward
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(config)


# Wan2.1's own release: its umT5-XXL encoder in Wan's module layout, and the tokenizer folder beside it.
WAN_T5_PATTERN = "models_t5_*.pth"  # models_t5_umt5-xxl-enc-bf16.pth
WAN_TOKENIZER = Path("google", "umt5-xxl")
WAN_T5_MAX_DISTANCE = 128  # Wan's relative-position embedding has a fixed maximum distance


def text_encoder_layout(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str]:
    """(tokenizer folder, encoder folder or Wan's .pth) of `path` on `fs` (local, or remote for the
    driver's checks): a Diffusers checkout (tokenizer/, text_encoder/), a Wan2.1 release folder
    (models_t5_*.pth + google/umt5-xxl/), Wan's .pth itself (its tokenizer beside it), or one folder
    holding both (a transformers save). Raises one line naming the path and what was expected."""
    path = path.rstrip("/")
    if fs.isfile(path) and path.endswith(".pth"):
        parent = path.rsplit("/", 1)[0]
        tokenizer = next((d for d in (f"{parent}/{WAN_TOKENIZER.as_posix()}", f"{parent}/tokenizer") if fs.isdir(d)), None)
        if tokenizer is None:
            raise FileNotFoundError(f"{path}: Wan's text encoder needs its tokenizer beside it ({WAN_TOKENIZER.as_posix()}/ or tokenizer/)")
        return tokenizer, path
    if fs.isdir(f"{path}/text_encoder"):
        return f"{path}/tokenizer", f"{path}/text_encoder"
    wan = sorted(fs.glob(f"{path}/{WAN_T5_PATTERN}"))
    if wan:
        return text_encoder_layout(fs, wan[0])
    config = json.loads(fs.cat(f"{path}/config.json")) if fs.isfile(f"{path}/config.json") else {}
    if config.get("model_type") not in ("umt5", "t5"):  # a release root's config.json is its DiT's
        raise FileNotFoundError(
            f"{path}: not a text encoder: expected a Diffusers checkout (text_encoder/, tokenizer/), a Wan2.1 release "
            f"({WAN_T5_PATTERN} + {WAN_TOKENIZER.as_posix()}/) or a transformers umT5 folder"
        )
    return path, path


def wan_t5_to_umt5(state: dict[str, torch.Tensor], source: str = "") -> tuple[UMT5Config, dict[str, torch.Tensor]]:
    """Wan's umT5 encoder checkpoint (its own module names) as transformers' UMT5EncoderModel: the
    config from the tensors' shapes, the keys renamed. Wan's feed-forward is fc1(x) * gelu(gate(x)),
    transformers' wi_1(x) * gelu(wi_0(x)); every block has its own relative-position table, as umT5's."""
    try:
        vocab, dim = state["token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        dim_attn, d_ff = state["blocks.0.attn.q.weight"].shape[0], state["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise ValueError(f"{source}: not Wan's umT5 encoder checkpoint (missing {err})") from None
    config = UMT5Config(
        vocab_size=vocab, d_model=dim, d_kv=dim_attn // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=WAN_T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
    )
    renames = {"norm1.weight": "layer.0.layer_norm.weight", "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
               **{f"attn.{x}.weight": f"layer.0.SelfAttention.{x}.weight" for x in "qkvo"},
               "norm2.weight": "layer.1.layer_norm.weight", "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
               "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    out = {"shared.weight": state["token_embedding.weight"], "encoder.embed_tokens.weight": state["token_embedding.weight"],
           "encoder.final_layer_norm.weight": state["norm.weight"]}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if rest not in renames:
                raise ValueError(f"{source}: unexpected key {key} for Wan's umT5 encoder")
            out[f"encoder.block.{index}.{renames[rest]}"] = value
    return config, out


def load_wan_t5(file: Path, dtype: torch.dtype) -> UMT5EncoderModel:
    from accelerate import init_empty_weights

    raw = load_pickled_tensors(file)
    config, state = wan_t5_to_umt5({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}, str(file))
    with init_empty_weights(include_buffers=False):
        encoder = UMT5EncoderModel(config)
    missing = sorted(set(encoder.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{file}: Wan's umT5 checkpoint lacks {missing[0]} ({len(missing)} missing)")
    encoder.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    encoder.tie_weights()
    return encoder


class TextEncoder(nn.Module):
    """Frozen prompt encoder: `encode(prompts)` -> (B, max_length, dim), zero past each prompt's tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, encoder: UMT5EncoderModel, max_length: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def toy(cls, max_length: int = 16, dim: int = 32, seed: int = 0, layers: int = 2, heads: int = 4) -> TextEncoder:
        """The toy world's encoder: identical weights for identical arguments."""
        tokenizer = build_toy_tokenizer(max_length)
        return cls(tokenizer, build_toy_encoder(len(tokenizer), dim, layers, heads, seed), max_length)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_length: int | None = None, dtype: torch.dtype = torch.float32
    ) -> TextEncoder:
        """Load a `save_pretrained` folder, or any umT5 folder (a Wan diffusers checkout included).

        max_length defaults to the tokenizer's `model_max_length`, or Wan's 512 when that is unset
        (tokenizers without one report a huge sentinel).
        """
        path = Path(node_cache(str(path)))  # s3:// and other fsspec URLs: this node's copy
        if not path.exists():
            raise FileNotFoundError(f"text encoder {str(path)!r} does not exist")
        tokenizer_dir, encoder_source = text_encoder_layout(fsspec.filesystem("file"), str(path))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if encoder_source.endswith(".pth"):
            encoder = load_wan_t5(Path(encoder_source), dtype)
        else:
            encoder = UMT5EncoderModel.from_pretrained(encoder_source, dtype=dtype)
        if max_length is None:
            max_length = tokenizer.model_max_length if tokenizer.model_max_length <= 100_000 else WAN_MAX_LENGTH
        return cls(tokenizer, encoder, max_length)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer/ and text_encoder/ under `path` (the diffusers pipeline layout)."""
        path = Path(path)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.encoder.save_pretrained(path / "text_encoder")

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, max_length): padded and truncated as Wan does."""
        batch = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, dim) in the encoder's dtype; rows past each prompt's length are exactly zero."""
        ids, mask = self.tokenize(prompts)
        device = self.encoder.device
        hidden = self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        # Wan slices each prompt to its length and pads with zeros; with right padding that is a mask.
        return hidden * mask.to(device=device, dtype=hidden.dtype)[..., None]

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)
