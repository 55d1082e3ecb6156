"""Prompt files in, Parquet datasets of text embeddings and latents out, and their readers.

Prompt files (local or any fsspec URL such as s3://), one file, a directory or a glob:

    .txt      one prompt per line
    .jsonl    one object per line: {"prompt": str, "seed": int (optional), "samples": int (optional)}
    .csv      a header row with a `prompt` column, optional `seed` and `samples` columns
    .parquet  a `prompt` string column, optional `seed` and `samples` integer columns

Captioned videos (`data.videos`) use the .jsonl / .csv / .parquet forms with a `video` field as well: an
mp4 path or URL, relative paths taken from the manifest's directory.

Bad lines (empty, over-long, undecodable, malformed) are reported with their file and line and skipped.

A preprocessed dataset is a directory of Parquet shards, one row per (prompt, seed) or captioned video:

    id              string   stable: hash of the normalised prompt and the seed (see `prompt_id`)
    prompt          string
    seed            int64    the noise seed of the teacher sample
    kind            string   "teacher" (the teacher's ODE output) or "real" (a VAE-encoded video)
    text_embedding  tensor (L, D)        the text encoder's output, padded rows exactly zero
    latent          tensor (C, F, H, W)  the clean latent
    trajectory      tensor (K, C, F, H, W): the ODE states at `trajectory_timesteps` (teacher rows; zeros in
                    real rows, which have none). Absent when no trajectory timesteps are configured.
    teacher_id      string   which teacher (or VAE) produced the latent
    config_hash     string   hash of every setting that determines the tensors

Tensor columns use Arrow's canonical `fixed_shape_tensor` type and hold no nulls (Parquet cannot read
back null fixed-size lists); the dtype is kept (bfloat16, which
Arrow lacks, is stored as its uint16 bit pattern with `torch_dtype: bfloat16` in the field metadata).
Beside the shards: `_dataset.json` (shapes, dtypes, trajectory timesteps, config hash, teacher id) and
`_negative_prompt.parquet` (the negative prompt's embedding, once). Names starting with `_` or `.` are
skipped by Parquet dataset readers, so `ray.data.read_parquet(dir)` sees only the shards. Shards are
written as `.tmp-*` and renamed when complete, so a killed run leaves only whole shards.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as globlib
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.storage import check_bucket, is_local, is_url, user_path

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
TENSOR_COLUMNS = ("text_embedding", "latent", "trajectory")
DATASET_INFO = "_dataset.json"
NEGATIVE_PROMPT = "_negative_prompt.parquet"
KINDS = ("teacher", "real")


# ----------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLine:
    """One usable prompt, with where it came from. `seed`/`samples` are None when the file does not say."""

    source: str
    line: int
    prompt: str
    seed: int | None = None
    samples: int | None = None
    video: str | None = None  # captioned videos only: where the clip is


@dataclass(frozen=True)
class BadLine:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def list_files(spec: str, suffixes: tuple[str, ...] = PROMPT_SUFFIXES) -> list[str]:
    """Files named by `spec` (a file, a directory or a glob; local or URL), sorted, with a supported suffix."""
    fs, path = fsspec.core.url_to_fs(spec)
    if not is_local(fs):
        check_bucket(fs, path)  # S3 reports a missing bucket as a missing file otherwise
    if globlib.has_magic(path):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"{spec}: no such file or directory")
    files = sorted(p for p in found if p.endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"{spec}: no files ending in {', '.join(suffixes)}")
    return [user_path(fs, p) for p in files]


def read_prompt_file(path: str, max_chars: int, max_chars_key: str = "data.max_prompt_chars") -> Iterator[PromptLine | BadLine]:
    """Every line of one prompt file, as a PromptLine or as a BadLine saying what is wrong with it.

    Raises ValueError (naming the file) only when the whole file is unusable: an unknown suffix, a CSV or
    Parquet file without a `prompt` column, or a Parquet file that does not parse."""
    data = _read_bounded(path)
    if path.endswith(".parquet"):
        rows = _parquet_rows(path, data)
    elif path.endswith(".csv"):
        rows = _csv_rows(path, data)
    elif path.endswith(".jsonl"):
        rows = _jsonl_rows(data)
    elif path.endswith(".txt"):
        rows = _text_rows(data)
    else:
        raise ValueError(f"{path}: unsupported prompt file (use {', '.join(PROMPT_SUFFIXES)})")
    folder = path.rsplit("/", 1)[0]
    for line, fields in rows:
        item = _validate(path, line, fields, max_chars, max_chars_key)
        if isinstance(item, PromptLine) and item.video and not is_url(item.video) and not item.video.startswith("/"):
            item = dataclasses.replace(item, video=f"{folder}/{item.video}")
        yield item


MAX_PROMPT_FILE_BYTES = 256 << 20  # a million prompts of 256 characters; a folder of files is read as one set


def _read_bounded(path: str) -> bytes:
    """A prompt file's bytes, refused in one line (naming the file) when it is larger than
    MAX_PROMPT_FILE_BYTES or, for the text formats, binary: memory stays bounded whatever a prompts
    folder holds. Lines longer than max_prompt_chars are then skipped one by one as bad lines."""
    fs, local = fsspec.core.url_to_fs(path)
    size = fs.size(local)
    if size is not None and size > MAX_PROMPT_FILE_BYTES:
        raise ValueError(f"{path}: {size / 2**20:.0f} MiB, more than the {MAX_PROMPT_FILE_BYTES >> 20} MiB a prompt file may "
                         "hold; split it into several files (a folder of prompt files is read as one set)")
    with fs.open(local, "rb") as f:
        data = f.read(MAX_PROMPT_FILE_BYTES + 1)  # a file that grew since: still bounded
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise ValueError(f"{path}: more than the {MAX_PROMPT_FILE_BYTES >> 20} MiB a prompt file may hold")
    if not path.endswith(".parquet") and (nul := data.find(b"\0", 0, 1 << 16)) >= 0:
        raise ValueError(f"{path}: binary, not a text prompt file (a NUL byte at offset {nul})")
    return data


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line does not start another
        lines.pop()
    for number, raw in enumerate(lines, 1):
        yield number, raw.rstrip(b"\r")


def _text_rows(data: bytes) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for number, raw in _lines(data):
        try:
            yield number, {"prompt": raw.decode("utf-8")}
        except UnicodeDecodeError as err:
            yield number, f"not UTF-8 (byte {err.start})"


def _jsonl_rows(data: bytes) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for number, raw in _lines(data):
        if not raw.strip():
            yield number, {"prompt": ""}
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield number, f"not UTF-8 (byte {err.start})"
            continue
        except json.JSONDecodeError as err:
            yield number, f"not JSON ({err.msg})"
            continue
        yield number, value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"


def _csv_rows(path: str, data: bytes) -> Iterator[tuple[int, dict[str, Any] | str]]:
    # Undecodable bytes become surrogates, so one bad line is reported without losing the file.
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise ValueError(f"{path}: CSV needs a header with a 'prompt' column, got {reader.fieldnames}")
    for row in reader:
        number = reader.line_num
        if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
            yield number, "not UTF-8"
            continue
        yield number, {k: v for k, v in row.items() if v not in (None, "") or k == "prompt"}


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_rows(path: str, data: bytes) -> Iterator[tuple[int, dict[str, Any] | str]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from err
    if "prompt" not in table.column_names:
        raise ValueError(f"{path}: Parquet file needs a 'prompt' column, got {table.column_names}")
    wanted = [c for c in ("prompt", "seed", "samples") if c in table.column_names]
    for number, row in enumerate(table.select(wanted).to_pylist(), 1):
        yield number, {k: v for k, v in row.items() if v is not None or k == "prompt"}


def _validate(path: str, line: int, fields: dict[str, Any] | str, max_chars: int, max_chars_key: str) -> PromptLine | BadLine:
    if isinstance(fields, str):
        return BadLine(path, line, fields)
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        return BadLine(path, line, "no 'prompt' string" if prompt is None else f"'prompt' is {type(prompt).__name__}")
    if not prompt.strip():
        return BadLine(path, line, "empty prompt")
    if len(prompt) > max_chars:
        return BadLine(path, line, f"prompt has {len(prompt)} characters, more than {max_chars_key}={max_chars}")
    numbers: dict[str, int | None] = {}
    for name, low in (("seed", 0), ("samples", 1)):
        value = fields.get(name)
        if value is None:
            numbers[name] = None
            continue
        try:
            number = int(value)
            if number != float(value) or number < low:
                raise ValueError
        except (TypeError, ValueError):
            return BadLine(path, line, f"'{name}' must be an integer >= {low}, got {value!r}")
        numbers[name] = number
    video = fields.get("video")
    if video is not None and (not isinstance(video, str) or not video.strip()):
        return BadLine(path, line, f"'video' must be a path, got {video!r}")
    return PromptLine(path, line, prompt.strip(), numbers["seed"], numbers["samples"], video.strip() if video else None)


def prompt_file_rows(path: str, max_chars: int, max_chars_key: str = "data.max_prompt_chars") -> list[dict[str, Any]]:
    """One prompt file as flat rows for Ray Data: source, line, prompt, seed (-1 = unset), samples (0 =
    unset), video ("" = none), reason (why the line is bad; empty when good). Line 0 with a reason: the whole file is bad."""
    rows = []
    try:
        for item in read_prompt_file(path, max_chars, max_chars_key):
            if isinstance(item, BadLine):
                rows.append({"source": item.source, "line": item.line, "prompt": "", "seed": -1, "samples": 0, "video": "", "reason": item.reason})
            else:
                seed = -1 if item.seed is None else item.seed
                rows.append({"source": item.source, "line": item.line, "prompt": item.prompt, "seed": seed,
                             "samples": item.samples or 0, "video": item.video or "", "reason": ""})
    except (ValueError, OSError) as err:
        rows.append({"source": path, "line": 0, "prompt": "", "seed": -1, "samples": 0, "video": "", "reason": str(err)})
    return rows


def split_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """(good rows in file order, bad lines); raises ValueError naming a file that is unusable as a whole."""
    rows = sorted(rows, key=lambda r: (r["source"], r["line"]))
    unusable = [r for r in rows if r["line"] == 0]
    if unusable:
        raise ValueError(unusable[0]["reason"])
    return [r for r in rows if not r["reason"]], [BadLine(r["source"], r["line"], r["reason"]) for r in rows if r["reason"]]


def normalise_prompt(prompt: str) -> str:
    """What makes two prompts the same: surrounding and repeated whitespace does not count."""
    return " ".join(prompt.split())


def prompt_id(prompt: str, seed: int) -> str:
    """Stable 16-hex-digit id of (normalised prompt, seed): the same on every machine and run."""
    return hashlib.sha256(f"{normalise_prompt(prompt)}\x00{seed}".encode()).hexdigest()[:16]


def video_id(prompt: str, video: str) -> str:
    """Stable id of a captioned video: its normalised caption and where the clip is."""
    return hashlib.sha256(f"{normalise_prompt(prompt)}\x00video:{video}".encode()).hexdigest()[:16]


def noise_seed(row_id: str) -> int:
    """The torch seed of a row's teacher noise: from its id alone, so a row's tensors do not depend on
    batching, actor count or resumption."""
    return int(row_id, 16) & ((1 << 63) - 1)


def config_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Tensor columns
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (a torch dtype name) of one tensor column."""

    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


_ARROW_STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "float64": pa.float64(), "bfloat16": pa.uint16()}


def tensor_array(values: torch.Tensor | np.ndarray) -> tuple[pa.ExtensionArray, str]:
    """(B, *shape) values -> (fixed_shape_tensor array of B rows, torch dtype name)."""
    tensor = torch.as_tensor(values)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _ARROW_STORAGE:
        raise TypeError(f"tensor columns hold {sorted(_ARROW_STORAGE)}, got {dtype}")
    flat = pack(tensor).reshape(len(tensor), -1)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), _ARROW_STORAGE[dtype]), flat.shape[1])
    kind = pa.fixed_shape_tensor(_ARROW_STORAGE[dtype], list(tensor.shape[1:]))
    return pa.ExtensionArray.from_storage(kind, storage), dtype


def pack(values: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array Ray Data can carry between stages (bfloat16 as its uint16 bits)."""
    values = values.detach().cpu().contiguous()
    return (values.view(torch.uint16) if values.dtype == torch.bfloat16 else values).numpy()


def unpack(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `pack`, given the torch dtype name."""
    tensor = torch.from_numpy(np.array(array))  # a writable copy: Ray hands out read-only arrays
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def tensor_values(column: pa.ChunkedArray | pa.Array, dtype: str) -> torch.Tensor:
    """A fixed_shape_tensor column without nulls -> (B, *shape) torch tensor of `dtype`."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = tuple(array.type.shape)
    flat = array.storage.flatten().to_numpy(zero_copy_only=False).reshape(len(array), *shape)
    tensor = torch.from_numpy(np.array(flat))  # a copy: Arrow buffers are read-only
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


# ----------------------------------------------------------------------------------------------------
# Dataset layout: info, shards, readers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """`_dataset.json`: what every shard of a dataset must match."""

    config_hash: str
    teacher_id: str
    text_embedding: TensorSpec
    latent: TensorSpec
    trajectory_timesteps: tuple[float, ...]
    negative_prompt: str
    schema_version: int = 1

    @property
    def trajectory(self) -> TensorSpec:
        return TensorSpec((len(self.trajectory_timesteps), *self.latent.shape), self.latent.dtype)

    @property
    def tensor_columns(self) -> tuple[str, ...]:
        return TENSOR_COLUMNS if self.trajectory_timesteps else TENSOR_COLUMNS[:2]

    def spec(self, column: str) -> TensorSpec:
        return {"text_embedding": self.text_embedding, "latent": self.latent, "trajectory": self.trajectory}[column]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> DatasetInfo:
        try:
            raw = json.loads(text)
            return cls(
                config_hash=raw["config_hash"],
                teacher_id=raw["teacher_id"],
                text_embedding=TensorSpec(tuple(raw["text_embedding"]["shape"]), raw["text_embedding"]["dtype"]),
                latent=TensorSpec(tuple(raw["latent"]["shape"]), raw["latent"]["dtype"]),
                trajectory_timesteps=tuple(raw["trajectory_timesteps"]),
                negative_prompt=raw["negative_prompt"],
                schema_version=raw["schema_version"],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{source}: not a oneforce dataset description ({err!r})") from err


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def _write_atomic(fs: fsspec.AbstractFileSystem, root: str, name: str, data: bytes) -> None:
    """Write `root/name` whole or not at all: to `.tmp-name` first, then rename (on S3, a single PUT of
    the temporary object and a server-side copy; a reader never sees a partial object either way)."""
    fs.makedirs(root, exist_ok=True)
    temporary, final = f"{root}/.tmp-{name}", f"{root}/{name}"
    with fs.open(temporary, "wb") as f:
        f.write(data)
    fs.mv(temporary, final)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_info(output: str, info: DatasetInfo) -> bool:
    """Write `_dataset.json`, or check an existing one matches (a resumed run must not mix configs).
    A dataset with no shard yet (an earlier run failed before writing a row) takes the new config.
    Returns whether the description was (re)written."""
    fs, root = _fs(output)
    path = f"{root}/{DATASET_INFO}"
    if fs.exists(path):
        existing = DatasetInfo.from_json(fs.cat(path).decode(), f"{output}/{DATASET_INFO}")
        if existing.config_hash == info.config_hash:
            return False
        shards = shard_paths(output)
        if shards:
            remove = f"rm -r {output}" if is_local(fs) else f"aws s3 rm --recursive {output}"
            raise ValueError(
                f"{output} holds {len(shards)} shards written with another config (hash {existing.config_hash}, "
                f"this run {info.config_hash}): resume it with the same settings, choose a new data.output, "
                f"or start over with `{remove}`"
            )
    _write_atomic(fs, root, DATASET_INFO, info.to_json().encode())
    return True


def read_info(output: str) -> DatasetInfo:
    fs, root = _fs(output)
    path = f"{root}/{DATASET_INFO}"
    if not fs.exists(path):
        raise FileNotFoundError(f"{output}: no {DATASET_INFO}; not a preprocessed dataset")
    return DatasetInfo.from_json(fs.cat(path).decode(), f"{output}/{DATASET_INFO}")


def write_negative_prompt(output: str, prompt: str, embedding: torch.Tensor, replace: bool = False) -> None:
    """The negative prompt's (L, D) embedding, once per dataset (again with `replace`: a new config)."""
    fs, root = _fs(output)
    if not replace and fs.exists(f"{root}/{NEGATIVE_PROMPT}"):
        return
    array, dtype = tensor_array(embedding[None])
    schema = pa.schema([pa.field("prompt", pa.string()), pa.field("text_embedding", array.type, metadata={"torch_dtype": dtype})])
    _write_atomic(fs, root, NEGATIVE_PROMPT, _table_bytes(pa.Table.from_arrays([pa.array([prompt]), array], schema=schema)))


def read_negative_prompt(output: str) -> torch.Tensor:
    fs, root = _fs(output)
    info = read_info(output)
    with fs.open(f"{root}/{NEGATIVE_PROMPT}", "rb") as f:
        table = pq.read_table(f)
    _check_tensor_field(table.schema, "text_embedding", info.text_embedding, f"{output}/{NEGATIVE_PROMPT}")
    return tensor_values(table.column("text_embedding"), info.text_embedding.dtype)[0]


def shard_schema(info: DatasetInfo) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
    ]
    for column in info.tensor_columns:
        spec = info.spec(column)
        kind = pa.fixed_shape_tensor(_ARROW_STORAGE[spec.dtype], list(spec.shape))
        fields.append(pa.field(column, kind, nullable=False, metadata={"torch_dtype": spec.dtype}))
    fields += [pa.field("teacher_id", pa.string(), nullable=False), pa.field("config_hash", pa.string(), nullable=False)]
    return pa.schema(fields)


def write_shard(output: str, info: DatasetInfo, rows: dict[str, Any]) -> str:
    """Write one shard of rows (columns as lists / (B, ...) tensors; `trajectory` None means zeros, for
    real rows) atomically; its name is a hash of its ids, so rewriting the same rows gives the same file.
    Returns the shard's path."""
    ids = list(rows["id"])
    count = len(ids)
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()),
        "prompt": pa.array(list(rows["prompt"]), pa.string()),
        "seed": pa.array([int(s) for s in rows["seed"]], pa.int64()),
        "kind": pa.array(list(rows["kind"]), pa.string()),
    }
    for column in info.tensor_columns:
        spec = info.spec(column)
        values = rows.get(column)
        if values is None and column == "trajectory":
            values = torch.zeros(count, *spec.shape, dtype=torch.float32)
        array, dtype = tensor_array(values)
        if tuple(array.type.shape) != spec.shape or dtype != spec.dtype:
            raise ValueError(f"{column} is {dtype}{list(array.type.shape)}, the dataset holds {spec.describe()}")
        columns[column] = array
    columns["teacher_id"] = pa.array([info.teacher_id] * count, pa.string())
    columns["config_hash"] = pa.array([info.config_hash] * count, pa.string())
    schema = shard_schema(info)
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    name = f"part-{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:16]}.parquet"
    fs, root = _fs(output)
    _write_atomic(fs, root, name, _table_bytes(table))
    return f"{output.rstrip('/')}/{name}"


def write_packed_batch(batch: dict[str, Any], output: str, info: DatasetInfo) -> dict[str, Any]:
    """Write a batch as the model stages hand it on (tensor columns `pack`ed, an optional `reason` per
    row saying why it has no tensors) as one shard of its usable rows. Returns every row's id, source,
    line and reason (empty when written), for the driver's summary. The Ray Data writer stage."""
    reasons = batch.get("reason", np.full(len(batch["id"]), ""))
    keep = np.flatnonzero(reasons == "")
    if len(keep):
        rows = {k: list(batch[k][keep]) for k in ("id", "prompt", "seed", "kind")}
        for column in info.tensor_columns:
            if column in batch:
                rows[column] = unpack(batch[column][keep], info.spec(column).dtype)
        write_shard(output, info, rows)
    return {"id": batch["id"], "source": batch["source"], "line": batch["line"], "reason": reasons}


def shard_paths(output: str) -> list[str]:
    """The dataset's complete shards (temporary files of an interrupted run are not listed)."""
    fs, root = _fs(output)
    fs.invalidate_cache(root)  # other processes (Ray workers) write shards; s3fs caches listings
    if not fs.exists(root):
        return []
    names = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))
    return [user_path(fs, p) for p in names]


def written_ids(output: str) -> set[str]:
    """Ids already in complete shards: a resumed run skips them."""
    ids: set[str] = set()
    for path in shard_paths(output):
        with fsspec.open(path, "rb") as f:
            ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return ids


def _check_tensor_field(schema: pa.Schema, column: str, spec: TensorSpec, source: str) -> None:
    field = schema.field(column)
    shape = tuple(getattr(field.type, "shape", ()) or ())
    dtype = (field.metadata or {}).get(b"torch_dtype", b"?").decode()
    if shape != spec.shape or dtype != spec.dtype:
        raise ValueError(f"{source}: column {column} is {dtype}{list(shape)}, the dataset holds {spec.describe()}")


def read_shard(path: str, info: DatasetInfo) -> dict[str, Any]:
    """One shard as columns (tensors for the tensor columns), checked against `info`: a wrong shape or
    dtype names the file and column, a bad value names the file and row."""
    try:
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
    except pa.ArrowException as err:
        raise ValueError(f"{path}: not a readable Parquet shard ({err})") from err
    expected = shard_schema(info)
    missing = [name for name in expected.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    for column in info.tensor_columns:
        _check_tensor_field(table.schema, column, info.spec(column), path)
    out: dict[str, Any] = {name: table.column(name).to_pylist() for name in ("id", "prompt", "seed", "kind", "teacher_id", "config_hash")}
    for row, (kind, hashed) in enumerate(zip(out["kind"], out["config_hash"])):
        if kind not in KINDS:
            raise ValueError(f"{path}: row {row} has kind {kind!r}, not one of {list(KINDS)}")
        if hashed != info.config_hash:
            raise ValueError(f"{path}: row {row} was made with config {hashed}, the dataset with {info.config_hash}")
    for column in info.tensor_columns:
        out[column] = tensor_values(table.column(column), info.spec(column).dtype)
    out.setdefault("trajectory", None)
    return out


def read_dataset(output: str) -> dict[str, Any]:
    """The whole dataset in memory, rows sorted by id (for tests, small toy runs and inspection; training
    reads shards through `ray.data.read_parquet` and `decode_batch`)."""
    info = read_info(output)
    shards = [read_shard(path, info) for path in shard_paths(output)]
    if not shards:
        raise FileNotFoundError(f"{output}: no shards")
    merged: dict[str, Any] = {}
    for name in shards[0]:
        if name in TENSOR_COLUMNS:
            merged[name] = None if shards[0][name] is None else torch.cat([s[name] for s in shards])
        else:
            merged[name] = [v for s in shards for v in s[name]]
    order = sorted(range(len(merged["id"])), key=merged["id"].__getitem__)
    return {k: (v[order] if isinstance(v, torch.Tensor) else None if v is None else [v[i] for i in order]) for k, v in merged.items()}


def decode_batch(batch: pa.Table, info: DatasetInfo) -> dict[str, Any]:
    """A batch from `ray.data.read_parquet(output).iter_batches(batch_format="pyarrow")` as training
    consumes it: ids, prompts and tensors of the dataset's dtypes, checked against `info`."""
    for column in ("text_embedding", "latent"):
        _check_tensor_field(batch.schema, column, info.spec(column), "batch")
    return {
        "id": batch.column("id").to_pylist(),
        "prompt": batch.column("prompt").to_pylist(),
        "kind": batch.column("kind").to_pylist(),
        "text_embedding": tensor_values(batch.column("text_embedding"), info.text_embedding.dtype),
        "latent": tensor_values(batch.column("latent"), info.latent.dtype),
    }
