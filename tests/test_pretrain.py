"""The toy teacher's pretraining job, run for real at test size."""

import json

import mlflow
import torch

from jobs.cli import parse
from jobs.pretrain_teacher import extra_args, main
from pipeline.checkpoint import load_state_json
from pipeline.pretrain import ToyBundle

SMALL = ["model.teacher_arch=toy-debug", "pretrain.batch_size=4", "pretrain.log_every=5", "pretrain.lr=3e-3",
         "pretrain.warmup_steps=5", "pretrain.eval_every=1000", "pretrain.eval_prompts=2", "pretrain.sample_steps=2",
         "pretrain.checkpoint_every=10"]


def run(out, steps, *more):
    cfg, args = parse("test", ["--config", "configs/toy_teacher.yaml", f"pretrain.output={out}",
                               f"pretrain.steps={steps}", *SMALL, *more], extra=extra_args)
    main(cfg, args)


def losses(out):
    return [float(line.split(",")[1]) for line in (out / "loss.csv").read_text().splitlines()]


def test_loss_falls_bundle_reloads_and_mlflow_has_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run(tmp_path / "run", 40, f"tracking.tracking_uri={uri}")
    curve = losses(tmp_path / "run")
    assert len(curve) == 8 and max(curve[-2:]) < 0.9 * curve[0]  # 2.43 -> 1.93 when written
    # the exported bundle is the EMA model, and reloads to identical outputs
    bundle = ToyBundle.load(tmp_path / "run" / "teacher")
    ema = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["ema"]
    assert all(torch.equal(bundle.transformer.state_dict()[k], v) for k, v in ema.items())
    x = torch.randn(1, 48, 9, 8, 8)
    text = bundle.text_encoder.encode(["a red square moving left, fast"])
    again = ToyBundle.load(tmp_path / "run" / "teacher")
    with torch.no_grad():
        assert torch.equal(bundle.transformer(x, torch.tensor([500.0]), text).sample,
                           again.transformer(x, torch.tensor([500.0]), text).sample)
    assert "adherence" in json.loads((tmp_path / "run" / "eval.json").read_text())
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["oneforce"])
    assert len(runs) == 1 and runs["params.pretrain.steps"][0] == "40"
    history = mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_resume_continues_exactly(tmp_path):
    run(tmp_path / "straight", 20, "tracking.tracking_uri=none")
    run(tmp_path / "split", 20, "tracking.tracking_uri=none", "--stop-at-step", "10")  # as if killed at 10
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["state"]["step"] == 10
    assert load_state_json(tmp_path / "split" / "state.json").step == 10
    run(tmp_path / "split", 20, "tracking.tracking_uri=none")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert straight["state"]["step"] == split["state"]["step"] == 20
    for key, value in straight["model"].items():
        assert torch.allclose(value, split["model"][key], atol=1e-6), key
