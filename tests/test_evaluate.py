"""jobs/evaluate.py on real mp4 files: rendered truth vs blurred clips, local and s3://, bad input."""

import json

import fsspec
import mlflow
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from jobs.cli import parse
from jobs.evaluate import extra_args, main
from pipeline import toyworld
from pipeline.config import load_config
from pipeline.tracking import use_experiment
from pipeline.video import write_mp4

PROMPTS = ["a red square moving left, fast", "a blue circle moving up, slow",
           "a yellow triangle moving right, fast", "a green circle moving down, slow"]


WORLD = load_config("configs/toy_teacher.yaml").world  # the world run() grades in


def write_set(directory, blur=0.0, manifest=True):
    rows = []
    for i, prompt in enumerate(PROMPTS):
        clip = toyworld.render(prompt, i, WORLD)
        if blur:
            clip = ndimage.gaussian_filter(clip, sigma=(0, blur, blur, 0))
        write_mp4(clip, directory / f"clip{i}.mp4")
        rows.append({"path": f"clip{i}.mp4", "prompt": prompt})
    if manifest:
        (directory / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def run(*argv):
    cfg, args = parse("test", ["--config", "configs/toy_teacher.yaml", *argv], extra=extra_args)
    main(cfg, args)


def test_truth_scores_high_blur_scores_low_and_mlflow_gets_it(tmp_path):
    write_set(tmp_path / "truth")
    write_set(tmp_path / "blurred", blur=1.2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    use_experiment(uri, "generated-videos")  # as the jobs make one: artifacts beside the store, not in ./mlruns
    run_id = mlflow.start_run().info.run_id
    mlflow.end_run()
    run("--videos", str(tmp_path / "truth"), "--out", str(tmp_path / "r1"), "--mlflow-run", run_id,
        f"tracking.tracking_uri={uri}")
    run("--videos", str(tmp_path / "blurred"), "--out", str(tmp_path / "r2"))
    truth = json.loads((tmp_path / "r1" / "report.json").read_text())
    blurred = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert truth["adherence"] == 1.0 and truth["sharpness"] == pytest.approx(1.0, abs=0.05)
    assert blurred["sharpness"] < 0.5 and blurred["frechet"] > 5 * truth["frechet"]
    assert pq.read_table(tmp_path / "r1" / "clips.parquet").num_rows == 4
    metrics = mlflow.get_run(run_id).data.metrics
    assert metrics["eval/adherence"] == 1.0


def test_prompts_file_pairing_and_s3(tmp_path, s3_server):
    write_set(tmp_path / "v", manifest=False)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "v"), "oneforce-test/eval/v", recursive=True)
    fs.put(str(tmp_path / "prompts.txt"), "oneforce-test/eval/prompts.txt")
    run("--videos", "s3://oneforce-test/eval/v", "--prompts", "s3://oneforce-test/eval/prompts.txt",
        "--out", str(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "report.json").read_text())["adherence"] == 1.0


def test_bad_input_is_named(tmp_path):
    write_set(tmp_path / "v", manifest=False)
    (tmp_path / "short.txt").write_text(PROMPTS[0] + "\n")
    with pytest.raises(ValueError, match="has 4 mp4 files but .*short.txt has 1 prompts"):
        run("--videos", str(tmp_path / "v"), "--prompts", str(tmp_path / "short.txt"))
    (tmp_path / "bad.txt").write_text("\n".join(PROMPTS[:3] + ["a purple square moving left, fast"]))
    with pytest.raises(ValueError, match="prompt 4 .*purple"):
        run("--videos", str(tmp_path / "v"), "--prompts", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "r"))
    (tmp_path / "v" / "clip0.mp4").write_bytes(b"not a video")
    (tmp_path / "good.txt").write_text("\n".join(PROMPTS))
    with pytest.raises(ValueError, match="clip0.mp4: cannot decode"):
        run("--videos", str(tmp_path / "v"), "--prompts", str(tmp_path / "good.txt"), "--out", str(tmp_path / "r"))
