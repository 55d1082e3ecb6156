"""jobs/generate.py on the shared local Ray: prompt files to decodable mp4 files and a manifest, resume,
identical seeds, and s3:// in and out on the local S3 server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from jobs import generate
from pipeline.generation import ClipGenerator
from pipeline.video import read_video
from tests.test_failures import REPO, run_statuses
from tests.test_generation import GENERATION_BASE, generation_config, save_toy_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_toy_checkpoint(tmp_path_factory.mktemp("student")))


def _cfg(*extra):
    return generation_config("generate.fps=8", "generate.resources={CPU: 1}", "tracking.tracking_uri=none", *extra)


def test_prompt_files_to_mp4_with_manifest_then_resume(ray_local, checkpoint, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a red square moving left, fast\n\na blue circle moving up, slow\n")
    (prompts / "b.jsonl").write_text('{"prompt": "a green triangle moving down, fast", "seed": 7, "samples": 2}\n{"seed": 1}\n')
    out = str(tmp_path / "videos")
    plan, new = generate.run(_cfg(), checkpoint, str(prompts), out)
    assert [str(b).rsplit("/", 1)[-1] for b in plan.bad] == ["a.txt:2: empty prompt", "b.jsonl:2: no 'prompt' string"]
    assert len(new) == 4
    manifest = [json.loads(line) for line in (tmp_path / "videos" / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["prompt"], r["seed"], r["sample"]) for r in manifest) == [
        ("a blue circle moving up, slow", 0, 0), ("a green triangle moving down, fast", 7, 0),
        ("a green triangle moving down, fast", 8, 1), ("a red square moving left, fast", 0, 0),
    ]
    for row in manifest:
        clip = read_video(tmp_path / "videos" / row["path"])
        assert clip.shape == (4, 32, 32, 3) and row["frames"] == 4 and row["path"] == f"{row['id']}_{row['sample']}.mp4"
        assert 0 < row["first_frame_seconds"] <= row["seconds"] and row["model_id"] == checkpoint
    # The same seed gives the same frames as the notebook API (up to H.264 rounding).
    triangle = next(r for r in manifest if r["seed"] == 8)
    direct = ClipGenerator.load(checkpoint, _cfg()).generate(triangle["prompt"], 8)
    assert np.abs(read_video(tmp_path / "videos" / triangle["path"]) - direct).max() < 0.08

    # Resume: a deleted clip is regenerated, bit for bit; finished ones are skipped.
    gone = tmp_path / "videos" / manifest[0]["path"]
    before = gone.read_bytes()
    gone.unlink()
    plan, new = generate.run(_cfg(), checkpoint, str(prompts), out)
    assert len(plan.kept) == 3 and [r["path"] for r in new] == [manifest[0]["path"]]
    assert gone.read_bytes() == before
    assert len((tmp_path / "videos" / "manifest.jsonl").read_text().splitlines()) == 4
    assert len(__import__("pyarrow.parquet").parquet.read_table(tmp_path / "videos" / "manifest.parquet")) == 4


def test_s3_prompts_and_output(ray_local, s3_server, checkpoint):
    fs = fsspec.filesystem("s3")
    fs.pipe("oneforce-test/gen/prompts.txt", b"a yellow square moving right, slow\n")
    plan, new = generate.run(_cfg(), checkpoint, "s3://oneforce-test/gen/prompts.txt", "s3://oneforce-test/gen/videos")
    assert len(new) == 1
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("oneforce-test/gen/videos"))
    assert names == sorted([new[0]["path"], "manifest.jsonl", "manifest.parquet"])
    local = fsspec.open_local(f"simplecache::s3://oneforce-test/gen/videos/{new[0]['path']}")
    assert read_video(local).shape == (4, 32, 32, 3)


def test_generator_actors_take_the_window_and_sink_from_the_config(checkpoint, tmp_path):
    """What the job hands its actors (the config as a dict) reaches the rollout: a long clip with a window
    and a sink, the frames of the notebook API with those settings."""
    from actors.generator import GeneratorStage

    long = ("generate.num_latent_frames=8", "generate.cache_window=3", "generate.sink_frames=1")
    stage = GeneratorStage(checkpoint, _cfg(*long).to_dict(), str(tmp_path))
    assert (stage.generator.settings.cache_window, stage.generator.settings.sink_frames) == (3, 1)
    batch = {"id": np.array(["x"]), "sample": np.array([0]), "prompt": np.array(["a red square moving left, fast"]), "seed": np.array([2])}
    row = stage(batch)
    assert row["frames"][0] == 8
    direct = ClipGenerator.load(checkpoint, _cfg(*long)).generate("a red square moving left, fast", 2)
    assert np.abs(read_video(tmp_path / row["path"][0]) - direct).max() < 0.08


def test_a_missing_checkpoint_is_named(ray_local, tmp_path):
    (tmp_path / "p.txt").write_text("a red square moving left, fast\n")
    with pytest.raises(FileNotFoundError, match="--checkpoint=.*nope: no such file"):
        generate.run(_cfg(), str(tmp_path / "nope"), str(tmp_path / "p.txt"), str(tmp_path / "out"))


def test_a_prompt_file_with_no_usable_line_is_an_error(ray_local, checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("\n" + "x" * 30 + "\n")
    with pytest.raises(ValueError, match=r"p.txt: no usable prompt \(2 lines read, 2 bad: .*:1: empty prompt; .*:2: prompt has 30 characters, more than generate.max_prompt_chars=20\)"):
        generate.run(_cfg("generate.max_prompt_chars=20"), checkpoint, str(tmp_path / "p.txt"), str(tmp_path / "out"))


def _manifest_rows(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_keeps_every_finished_clip_and_marks_the_run_killed(ray_local, ray_cluster, checkpoint, tmp_path, signum):
    """A real SIGINT (Ctrl-C) or SIGTERM to `python jobs/generate.py` while it works: one line, no
    traceback, the manifest lists every clip finished, MLflow says KILLED, the rerun does the rest."""
    prompts, out, uri = tmp_path / "p.txt", tmp_path / "videos", f"sqlite:///{tmp_path}/mlflow.db"
    count = 24
    prompts.write_text("".join(f"a red square moving left, fast {i}\n" for i in range(count)))
    overrides = [*GENERATION_BASE, "generate.fps=8", "generate.resources={CPU: 1}", f"tracking.tracking_uri={uri}", f"ray.address={ray_cluster[0]}"]
    env = {**os.environ, "ONEFORCE_LOG_DIR": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        [sys.executable, "jobs/generate.py", "--checkpoint", checkpoint, "--prompts", str(prompts), "--out", str(out), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    while len(_manifest_rows(out)) < 2:  # the manifest is written after every finished clip
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.1)
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=120)
    kept = _manifest_rows(out)
    assert job.returncode == 128 + signum, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith(("interrupted:", "error:"))] == [
        f"interrupted: {len(kept)} clips kept; rerun to continue"
    ], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert 2 <= len(kept) < count and all((out / r["path"]).exists() for r in kept)
    assert run_statuses(uri) == ["KILLED"]
    if signum != signal.SIGINT:
        return  # the rerun continues the same way whichever signal stopped the run

    plan, new = generate.run(_cfg(), checkpoint, str(prompts), str(out))
    assert len(plan.kept) == len(kept) and len(new) == count - len(kept)


def test_clip_plans_give_ids_seeds_and_skip_duplicates_and_finished_clips(tmp_path):
    """plan_clips without Ray: a line's own seed and samples win over the config's, a repeated prompt
    is counted once, and a manifest row is kept only while its file exists."""
    from pipeline import data
    from pipeline.config import GenerateConfig
    from pipeline.planning import plan_clips

    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a red square moving left, fast"}\n{"prompt": "a red square moving left, fast"}\n'
        '{"prompt": "a blue circle moving up, slow", "seed": 7, "samples": 2}\n{"seed": 1}\n'
    )
    parsed = data.prompt_file_rows(str(tmp_path / "p.jsonl"), 100)
    red, blue = data.prompt_id("a red square moving left, fast", 3), data.prompt_id("a blue circle moving up, slow", 7)
    manifest = [{"id": blue, "sample": 0, "path": f"{blue}_0.mp4"}, {"id": red, "sample": 0, "path": f"{red}_0.mp4"}]
    plan = plan_clips(parsed, GenerateConfig(seed=3), manifest, existing={f"{blue}_0.mp4"})
    assert [(r["id"], r["sample"], r["seed"]) for r in plan.pending] == [(red, 0, 3), (blue, 1, 8)]
    assert plan.kept == [manifest[0]] and plan.duplicates == 1 and plan.lines == 4 and len(plan.bad) == 1


def test_dry_run_checks_of_generate_and_serve_read_the_export_and_name_a_broken_one(tmp_path):
    """Both jobs' --dry-run check: the shipped toy student passes (layout, shapes, the text encoder and
    codec folders it carries); a directory without transformer/ is named as --checkpoint."""
    import argparse
    import shutil

    from jobs import serve
    from pipeline.config import load_config

    shipped = REPO / "pipeline" / "assets" / "toy_student"
    cfg = load_config(None, [f"model.text_encoder_path={shipped / 'text_encoder'}", f"model.codec={shipped / 'codec'}"])
    broken = tmp_path / "export"
    shutil.copytree(shipped, broken)
    shutil.rmtree(broken / "transformer")
    for job in (generate, serve):
        job.check(cfg, argparse.Namespace(checkpoint=str(shipped)))  # raises nothing
        with pytest.raises(FileNotFoundError, match=f"^--checkpoint={broken}: a directory needs a transformer/ folder"):
            job.check(cfg, argparse.Namespace(checkpoint=str(broken)))
