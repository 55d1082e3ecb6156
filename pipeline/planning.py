"""Prompt files to a plan of work, shared by the preprocessing and generation jobs: every line of every
file parsed on Ray (one task per file), stable ids, duplicates and finished work skipped; and the Ray
options of their actor pools. A job decides nothing of this itself: it reads its config, plans with
these functions, builds its Ray objects and runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import data
from pipeline.config import GenerateConfig

SHOWN_BAD_LINES = 20


def ray_resources(resources: dict[str, float]) -> dict[str, Any]:
    """A config resource dict ({"CPU": 1, "GPU": 1, "custom": 1}) as Ray's num_cpus/num_gpus/resources."""
    rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), **({"resources": rest} if rest else {})}


def parse_prompt_files(files: list[str], max_chars: int, max_chars_key: str = "data.max_prompt_chars") -> list[dict[str, Any]]:
    """Every line of every file (`data.prompt_file_rows`), one Ray task per file. `max_chars_key` is
    the setting an over-long line's reason names."""
    items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return items.flat_map(lambda row: data.prompt_file_rows(row["path"], max_chars, max_chars_key), num_cpus=0.5).take_all()


@dataclasses.dataclass
class RowPlan:
    """What a preprocessing run will do, decided on the driver from the parsed prompt lines."""

    pending: list[dict[str, Any]]  # rows to compute: id, prompt, seed, kind, source, line (+ video)
    lines: int
    bad: list[data.BadLine]
    duplicates: int
    already_written: int


def plan_rows(parsed: list[dict[str, Any]], default_seed: int, written: set[str], kind: str = "teacher") -> RowPlan:
    """Give every (prompt, seed) its id (teacher rows: samples expand into seeds) or every captioned
    video its id (real rows), keep the first of duplicates, skip ids already written. Lines keep file
    order, so the plan is the same on every run."""
    good, bad = data.split_rows(parsed)
    seen: set[str] = set()
    pending, duplicates, already = [], 0, 0
    for r in good:
        if kind == "real" and not r["video"]:
            bad.append(data.BadLine(r["source"], r["line"], "no 'video' field"))
            continue
        first = default_seed if r["seed"] < 0 else r["seed"]
        seeds = [first] if kind == "real" else range(first, first + max(1, r["samples"]))
        for seed in seeds:
            row_id = data.video_id(r["prompt"], r["video"]) if kind == "real" else data.prompt_id(r["prompt"], seed)
            if row_id in seen:
                duplicates += 1
                continue
            seen.add(row_id)
            if row_id in written:
                already += 1
                continue
            row = {"id": row_id, "prompt": r["prompt"], "seed": seed, "kind": kind, "source": r["source"], "line": r["line"]}
            pending.append({**row, "video": r["video"]} if kind == "real" else row)
    return RowPlan(pending, len(parsed), bad, duplicates, already)


def merge(plans: list[RowPlan]) -> RowPlan:
    return RowPlan(
        [r for p in plans for r in p.pending], sum(p.lines for p in plans), [b for p in plans for b in p.bad],
        sum(p.duplicates for p in plans), sum(p.already_written for p in plans),
    )


@dataclasses.dataclass
class ClipPlan:
    """What a generation run will do: the clips to make and the finished ones the manifest keeps."""

    pending: list[dict[str, Any]]  # id, sample, prompt, seed, source, line
    kept: list[dict[str, Any]]  # manifest rows of finished clips
    lines: int
    bad: list[data.BadLine]
    duplicates: int


def plan_clips(parsed: list[dict[str, Any]], cfg: GenerateConfig, manifest: list[dict[str, Any]], existing: set[str]) -> ClipPlan:
    """Every (prompt, sample) its id and seed (a line's own seed and samples, else `cfg`'s), the first of
    duplicates kept, and clips whose manifest row names an existing file kept as they are."""
    good, bad = data.split_rows(parsed)
    finished = {(r["id"], r["sample"]): r for r in manifest if r.get("path") in existing}
    seen: set[tuple[str, int]] = set()
    pending, kept, duplicates = [], [], 0
    for r in good:
        base = cfg.seed if r["seed"] < 0 else r["seed"]
        row_id = data.prompt_id(r["prompt"], base)
        for sample in range(r["samples"] or cfg.samples):
            key = (row_id, sample)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            if key in finished:
                kept.append(finished[key])
                continue
            pending.append({"id": row_id, "sample": sample, "prompt": r["prompt"], "seed": base + sample, "source": r["source"], "line": r["line"]})
    return ClipPlan(pending, kept, len(parsed), bad, duplicates)


# Manifests of a generation output directory (shared by jobs/generate.py and the quickstart).

MANIFEST_JSONL, MANIFEST_PARQUET = "manifest.jsonl", "manifest.parquet"


def read_manifest(out: str) -> list[dict[str, Any]]:
    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{MANIFEST_JSONL}"
    if not fs.exists(path):
        return []
    rows = []
    for number, line in enumerate(fs.cat(path).decode().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{out}/{MANIFEST_JSONL}:{number}: not JSON ({err.msg}); move the manifest away to regenerate") from None
    return rows


def write_manifest(out: str, rows: list[dict[str, Any]]) -> None:
    """Both manifests, each written whole under a temporary name and renamed."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["id"], r["sample"]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    for name, payload in ((MANIFEST_JSONL, "".join(json.dumps(r) + "\n" for r in rows).encode()), (MANIFEST_PARQUET, sink.getvalue().to_pybytes())):
        with fs.open(f"{root}/.tmp-{name}", "wb") as f:
            f.write(payload)
        fs.mv(f"{root}/.tmp-{name}", f"{root}/{name}")


def existing_files(out: str) -> set[str]:
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return set()
    return {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if p.endswith(".mp4")}
