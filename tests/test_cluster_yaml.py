"""cluster.yaml passes the Ray cluster launcher's own schema and checks (no cloud calls), and the
setup installs the package under the pinned constraints."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = prepare_config(CLUSTER)
    validate_config(config)
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in config["available_node_types"]
    assert any("-c constraints.txt" in command for command in config["setup_commands"])


def test_the_validation_would_catch_a_broken_one():
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**CLUSTER, "head_node_type": "missing"}))
