"""Config: defaults <- YAML <- dotted overrides, strict keys and types."""

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "train": {"lr": 2e-5}, "model": {"num_latent_frames": 9}}))
    cfg = load_config(str(path), ["train.lr=3e-6", "model.frames_per_block=3", "method.gradient_num_blocks=2",
                                  "method.denoising_steps=[1000, 750, 500, 250]"])
    assert cfg.name == "exp" and cfg.train.lr == 3e-6 and cfg.model.frames_per_block == 3
    assert cfg.model.num_blocks == 3 and cfg.method.denoising_steps == [1000, 750, 500, 250]
    assert cfg.train.critic_lr == 1e-5  # untouched default
    assert load_config(None, []).to_dict() == Config().to_dict()


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("train.lr=fast", "train.lr: expected float"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("model.dtype=float16", "model.dtype: 'float16' is not one of"),
    ("method.denoising_steps=[250, 1000]", "method.denoising_steps must be decreasing"),
    ("model.frames_per_block=4", "model.num_latent_frames=21 is not a multiple of model.frames_per_block=4"),
    ("method.gradient_num_blocks=30", "method.gradient_num_blocks=30 exceeds"),
    ("train", "not of the form"),
    ("train.lr.x=1", "train.lr: expected float"),
    ("serve.upscale_delay_s=-1", "serve.upscale_delay_s must be >= 0, got -1"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["ray.resources_per_worker={CPU: 2, GPU: 1}", "train.zero_stage=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)).to_dict() == cfg.to_dict()
