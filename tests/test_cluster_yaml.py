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


# vCPUs and GPUs of the instance types cluster.yaml names (AWS's published sizes), for the fit check.
INSTANCES = {"m6i.4xlarge": (16, 0), "p4de.24xlarge": (96, 8), "g6e.12xlarge": (48, 4)}
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def requests(cfg) -> list[tuple[str, dict[str, float], int]]:
    """(setting, resources of one unit, units) for every role a config places."""
    r = cfg.ray
    roles = [("ray.resources_per_worker", r.resources_per_worker, r.num_workers),
             ("ray.teacher_resources", r.teacher_resources, max(r.teacher_actors, 1)),
             ("ray.encoder_resources", r.encoder_resources, r.encoder_actors),
             ("generate.resources", cfg.generate.resources, cfg.generate.actors)]
    if r.critic_placement == "actors":
        roles.append(("ray.critic_resources", r.critic_resources, r.critic_actors))
    return roles


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("wan_*.yaml")))
def test_every_custom_resource_a_config_asks_for_is_offered_by_a_node_type_that_fits_it(config):
    """`ray up cluster.yaml` then the config's jobs: each role's custom resource exists on some node
    type, whose instance has the CPUs and GPUs that many units ask for, in enough nodes for all units."""
    from pipeline.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / config))
    nodes = CLUSTER["available_node_types"]
    assert {n["node_config"]["InstanceType"] for n in nodes.values()} <= INSTANCES.keys()
    labelled = 0
    for setting, unit, units in requests(cfg):
        custom = sorted(set(unit) - STANDARD)
        for name in custom:
            offering = [(key, node) for key, node in nodes.items() if node.get("resources", {}).get(name, 0) > 0]
            assert offering, f"{config}: {setting} asks for '{name}', which no node type in cluster.yaml offers"
            key, node = offering[0]
            per_node = int(node["resources"][name] // unit[name])
            cpus, gpus = INSTANCES[node["node_config"]["InstanceType"]]
            assert per_node * unit.get("CPU", 1) <= cpus and per_node * unit.get("GPU", 0) <= gpus, (config, setting, key)
            assert per_node * node["max_workers"] >= units, f"{config}: {units} units of {setting} do not fit {key}"
            labelled += 1
    assert labelled >= 3  # student, teacher and critic each pinned to their own node type
