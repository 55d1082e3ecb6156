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
INSTANCES = {"m6i.4xlarge": (16, 0), "g6e.12xlarge": (48, 4), "p5.48xlarge": (192, 8)}
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


def start_commands() -> list[str]:
    return [*CLUSTER["head_start_ray_commands"], *CLUSTER["worker_start_ray_commands"]]


def test_nothing_listens_for_the_outside_but_ssh():
    """The job server (code execution by design) and the tracking server are not on a public interface,
    Ray's token authentication is on, and the security group Ray makes opens only SSH to the outside."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    commands = start_commands()
    assert not any("0.0.0.0" in command for command in commands)
    ray_starts = [c for c in commands if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert not any("RAY_AUTH_MODE=disabled" in c for c in commands)
    head = next(c for c in ray_starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard cluster.yaml`
    mlflow = next(c for c in commands if "mlflow server" in c and "nohup" in c)
    assert "--app-name basic-auth" in mlflow and "--host $(hostname -I" in mlflow  # the private address
    # Secrets come from mounted files, never from the config's text (which `ray up` prints).
    assert "/home/ubuntu/.ray/auth_token" in CLUSTER["file_mounts"] and "/home/ubuntu/.oneforce/mlflow.env" in CLUSTER["file_mounts"]
    assert not any(f"{name}=" in c for c in commands for name in ("MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"))

    # No node type brings its own security groups, so Ray's default applies: SSH from anywhere, all
    # traffic only from the cluster's own group.
    assert not any("SecurityGroupIds" in t["node_config"] for t in CLUSTER["available_node_types"].values())
    outside = [rule for rule in _create_default_inbound_rules(["sg-cluster"]) if "IpRanges" in rule]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in outside] == [(22, 22, "tcp")]


def test_a_pkill_pattern_does_not_match_its_own_command_line():
    """`ray up` runs each start command as `bash -c '<command>'`: a `pkill -f PATTERN` whose pattern
    matches its own text kills that shell, and the head's setup fails ("SSH command failed")."""
    import re
    import shlex

    for command in start_commands():
        for match in re.finditer(r"pkill -f (\"[^\"]+\"|\S+)", command):
            pattern = shlex.split(match.group(1))[0]
            assert not re.search(pattern, f"bash --login -c -i '{command}'"), command
