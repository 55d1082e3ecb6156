"""Text encoding: the toy umT5 behaves like Wan's (zeros past the prompt), and loads the way a real
umT5 folder does."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from pipeline import toyworld
from pipeline.models.text import TextEncoder, build_toy_encoder, build_toy_tokenizer

PROMPTS = ["a red square moving left, fast", "a red square moving left and a blue circle moving up, slow"]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.toy(max_length=16, dim=32, seed=0)


def test_toy_encoder_is_deterministic_and_leaves_the_global_rng_alone(encoder):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = TextEncoder.toy(max_length=16, dim=32, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(again.encode(PROMPTS), encoder.encode(PROMPTS))
    assert not torch.equal(TextEncoder.toy(seed=1).encode(PROMPTS), encoder.encode(PROMPTS))


def test_shape_and_zeros_past_each_prompt(encoder):
    ids, mask = encoder.tokenize(PROMPTS)
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.shape == (2, 16, 32) and embeddings.dtype == torch.float32
    # "a red square moving left , fast" is 7 words + eos; the two-object prompt 13 + eos.
    assert mask.sum(1).tolist() == [8, 14]
    assert ids[0, 7].item() == encoder.tokenizer.eos_token_id and ids[0, 8].item() == encoder.tokenizer.pad_token_id
    assert (embeddings[0, 8:] == 0).all() and (embeddings[1, 14:] == 0).all()
    assert (embeddings[0, :8].abs().sum(-1) > 0).all()


def test_every_grammar_word_is_its_own_token():
    tokenizer = build_toy_tokenizer()
    ids = tokenizer(toyworld.vocabulary(), add_special_tokens=False).input_ids
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
    assert tokenizer.unk_token_id not in {i[0] for i in ids}


def test_unknown_words_become_unk(encoder):
    ids, mask = encoder.tokenize(["A PURPLE hexagon moving sideways!"])
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids[0, : int(mask.sum())])
    assert tokens == ["a", "<unk>", "<unk>", "moving", "<unk>", "<unk>", "</s>"]
    assert torch.isfinite(encoder.encode(["A PURPLE hexagon moving sideways!"])).all()


def test_long_prompts_are_truncated_to_max_length(encoder):
    ids, mask = encoder.tokenize([" ".join(["a red square moving left and"] * 5)])
    assert ids.shape == (1, 16) and mask.all()


def test_save_and_load_give_identical_embeddings(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer").is_dir() and (tmp_path / "text_encoder" / "config.json").is_file()
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert isinstance(loaded.tokenizer, PreTrainedTokenizerFast) and loaded.max_length == 16
    assert torch.equal(loaded.encode(PROMPTS), encoder.encode(PROMPTS))
    assert TextEncoder.from_pretrained(tmp_path, max_length=24).encode(PROMPTS).shape == (2, 24, 32)


def test_a_flat_umt5_folder_loads_through_the_same_path(tmp_path):
    # A plain umT5 checkout keeps tokenizer files and weights side by side.
    tokenizer = build_toy_tokenizer(max_length=12)
    model = build_toy_encoder(len(tokenizer), dim=16, heads=2, seed=3)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert loaded.dim == 16 and loaded.encode(PROMPTS).shape == (2, 12, 16)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "nope")
