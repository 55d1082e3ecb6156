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
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from pipeline import toyworld
from pipeline.storage import node_cache

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


def _parts(path: Path) -> tuple[Path, Path]:
    """(tokenizer dir, encoder dir): a diffusers pipeline layout (tokenizer/, text_encoder/) or one folder."""
    if (path / "text_encoder").is_dir():
        return path / "tokenizer", path / "text_encoder"
    return path, path


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
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory {str(path)!r} does not exist")
        tokenizer_dir, encoder_dir = _parts(path)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        encoder = UMT5EncoderModel.from_pretrained(encoder_dir, dtype=dtype)
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
