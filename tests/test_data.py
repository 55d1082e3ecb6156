"""Prompt-file parsing and the Parquet dataset layout (no Ray): bad lines named by file and line, stable
ids, tensor columns that keep shape and dtype, atomic shards, and readers that name what is wrong."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import data


def _write_prompt_files(root):
    (root / "a.txt").write_bytes(b"a red square moving left, fast\n\n  \nbad \xff byte\n" + b"x" * 50 + b"\nlast line no newline")
    (root / "b.jsonl").write_text(
        '{"prompt": "one", "seed": 3, "samples": 2}\n{"prompt": ""}\nnot json\n[1, 2]\n{"prompt": "two", "seed": -1}\n{"text": "x"}\n'
    )
    (root / "c.csv").write_text('prompt,seed\n"with, comma",7\n,\nplain,\n')
    pq.write_table(pa.table({"prompt": ["p1", None, "p3"], "samples": [1, 2, None]}), root / "d.parquet")
    (root / "ignored.md").write_text("not a prompt file")


def test_every_format_parses_and_bad_lines_are_named(tmp_path):
    _write_prompt_files(tmp_path)
    files = data.list_files(str(tmp_path))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.txt", "b.jsonl", "c.csv", "d.parquet"]
    good, bad = [], []
    for f in files:
        for item in data.read_prompt_file(f, max_chars=40):
            (bad if isinstance(item, data.BadLine) else good).append(item)
    assert [(g.prompt, g.seed, g.samples) for g in good] == [
        ("a red square moving left, fast", None, None), ("last line no newline", None, None),
        ("one", 3, 2), ("with, comma", 7, None), ("plain", None, None), ("p1", None, 1), ("p3", None, None),
    ]
    named = {(b.source.rsplit("/", 1)[-1], b.line): b.reason for b in bad}
    assert named[("a.txt", 2)] == named[("a.txt", 3)] == "empty prompt"
    assert named[("a.txt", 4)].startswith("not UTF-8")
    assert "50 characters" in named[("a.txt", 5)] and "data.max_prompt_chars=40" in named[("a.txt", 5)]
    assert named[("b.jsonl", 2)] == "empty prompt" and named[("b.jsonl", 3)].startswith("not JSON")
    assert "JSON object" in named[("b.jsonl", 4)] and "'seed' must be an integer >= 0" in named[("b.jsonl", 5)]
    assert named[("b.jsonl", 6)] == "no 'prompt' string"
    assert named[("c.csv", 3)] == "empty prompt" and named[("d.parquet", 2)] == "no 'prompt' string"
    assert len(bad) == 11
    assert str(bad[0]).startswith(f"{tmp_path}/a.txt:2: ")


def test_a_file_without_a_prompt_column_is_one_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"x\.csv: CSV needs a header with a 'prompt' column"):
        list(data.read_prompt_file(str(tmp_path / "x.csv"), 100))
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.list_files(str(tmp_path / "missing.txt"))


def test_ids_are_stable_whitespace_blind_and_seed_specific():
    assert data.prompt_id("a  red square ", 0) == data.prompt_id("a red square", 0) == "576182b67860bcc0"
    assert data.prompt_id("a red square", 1) != data.prompt_id("a red square", 0)
    assert data.prompt_id("A red square", 0) != data.prompt_id("a red square", 0)


def _info(text_dtype="bfloat16", keep=(1000.0, 500.0)):
    return data.DatasetInfo(
        config_hash="c0ffee", teacher_id="random:tiny:0",
        text_embedding=data.TensorSpec((6, 8), text_dtype), latent=data.TensorSpec((4, 3, 2, 2), "float32"),
        trajectory_timesteps=keep, negative_prompt="",
    )


def _rows(n, info, trajectory=True):
    g = torch.Generator().manual_seed(0)
    return {
        "id": [f"{i:016x}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)], "seed": list(range(n)), "kind": ["teacher"] * n,
        "text_embedding": torch.randn(n, 6, 8, generator=g).to(torch.bfloat16 if info.text_embedding.dtype == "bfloat16" else torch.float32),
        "latent": torch.randn(n, 4, 3, 2, 2, generator=g),
        "trajectory": torch.randn(n, 2, 4, 3, 2, 2, generator=g) if trajectory else None,
    }


def test_shards_round_trip_exactly_with_dtype_kept(tmp_path):
    info = _info()
    out = str(tmp_path / "ds")
    data.write_info(out, info)
    rows = _rows(5, info)
    path = data.write_shard(out, info, rows)
    assert data.write_shard(out, info, rows) == path  # named by content: rewriting is idempotent
    back = data.read_shard(path, data.read_info(out))
    assert back["id"] == rows["id"] and back["seed"] == rows["seed"] and back["teacher_id"] == ["random:tiny:0"] * 5
    assert back["text_embedding"].dtype == torch.bfloat16 and torch.equal(back["text_embedding"], rows["text_embedding"])
    assert torch.equal(back["latent"], rows["latent"]) and torch.equal(back["trajectory"], rows["trajectory"])
    # Canonical Arrow tensors: any Arrow reader sees the shape.
    field = pq.read_schema(path).field("latent")
    assert field.type.shape == [4, 3, 2, 2] and field.metadata[b"torch_dtype"] == b"float32"
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".tmp-")]


def test_without_trajectory_timesteps_there_is_no_trajectory_and_temporaries_are_ignored(tmp_path):
    info = _info(text_dtype="float32", keep=())
    out = str(tmp_path / "ds")
    data.write_info(out, info)
    data.write_shard(out, info, _rows(3, info, trajectory=False))
    (tmp_path / "ds" / ".tmp-part-dead.parquet").write_bytes(b"half a shard")  # a killed run's leftover
    assert len(data.shard_paths(out)) == 1 and data.written_ids(out) == {f"{i:016x}" for i in range(3)}
    assert data.read_dataset(out)["trajectory"] is None


def test_readers_name_the_file_column_and_row(tmp_path):
    info = _info()
    out = str(tmp_path / "ds")
    data.write_info(out, info)
    path = data.write_shard(out, info, _rows(3, info))
    wrong = data.DatasetInfo(**{**info.__dict__, "latent": data.TensorSpec((4, 3, 4, 4), "float32")})
    with pytest.raises(ValueError, match=r"part-.*\.parquet: column latent is float32\[4, 3, 2, 2\], the dataset holds float32\[4, 3, 4, 4\]"):
        data.read_shard(path, wrong)
    table = pq.read_table(path)
    kinds = table.column("kind").to_pylist()
    kinds[2] = "fake"
    pq.write_table(table.set_column(table.schema.get_field_index("kind"), "kind", pa.array(kinds)), path)
    with pytest.raises(ValueError, match=r"part-.*\.parquet: row 2 has kind 'fake'"):
        data.read_shard(path, info)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"part-.*\.parquet: not a readable Parquet shard"):
        data.read_shard(path, info)


def test_a_resumed_run_with_another_config_is_refused_once_it_has_shards(tmp_path):
    out = str(tmp_path / "ds")
    other = data.DatasetInfo(**{**_info().__dict__, "config_hash": "other"})
    assert data.write_info(out, other)  # nothing written yet: a new config takes over (a failed run's rerun)
    assert data.write_info(out, _info())
    assert not data.write_info(out, _info())  # same config: fine, nothing rewritten
    data.write_shard(out, _info(), _rows(2, _info()))
    with pytest.raises(ValueError, match="written with another config.*rm -r"):
        data.write_info(out, other)
    assert json.loads((tmp_path / "ds" / "_dataset.json").read_text())["config_hash"] == "c0ffee"


def test_huge_binary_and_megabyte_line_prompt_files(tmp_path, monkeypatch):
    """Memory stays bounded whatever a prompts folder holds: a file over the cap or a binary one is
    refused in one line naming it; a megabyte line is one bad line among good ones."""
    long = tmp_path / "long.txt"
    long.write_bytes(b"a red square moving left, fast\n" + b"x" * (1 << 20) + b"\na blue circle moving up, slow\n")
    items = list(data.read_prompt_file(str(long), max_chars=100))
    assert [i.prompt for i in items if isinstance(i, data.PromptLine)] == ["a red square moving left, fast", "a blue circle moving up, slow"]
    assert [(b.line, "1048576 characters" in b.reason) for b in items if isinstance(b, data.BadLine)] == [(2, True)]

    binary = tmp_path / "weights.txt"
    binary.write_bytes(torch.randn(1000).numpy().tobytes() + b"\0")
    with pytest.raises(ValueError, match=r"^.*weights\.txt: binary, not a text prompt file \(a NUL byte at offset \d+\)$"):
        list(data.read_prompt_file(str(binary), 100))

    monkeypatch.setattr(data, "MAX_PROMPT_FILE_BYTES", 1 << 20)  # the cap, made small enough to test
    with pytest.raises(ValueError, match=r"long\.txt: 1 MiB, more than the 1 MiB a prompt file may hold; split it"):
        list(data.read_prompt_file(str(long), 100))
