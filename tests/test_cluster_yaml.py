"""cluster.yaml is checked the way `ray up` checks it, offline.

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster) loads the
file with yaml.safe_load and calls _bootstrap_config, which runs
prepare_config (AWS defaults merged in, setup commands merged, per-type
min/max workers filled), then the provider's resource autodetection (skipped
here: every node type states its resources, so it has nothing to fill), then
validate_config (ray-schema.json + the cross-field checks), then the AWS
bootstrap that needs credentials (not run here). The first and last
validation steps below are Ray's own functions, unmodified.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does with the config before it touches the cloud."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_up_validation():
    config = load()
    assert config["provider"]["type"] in _NODE_PROVIDERS
    prepared = ray_up_checks(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    # per-type limits are explicit and within the global cap
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]
    for name, node_type in types.items():
        assert node_type["max_workers"] <= prepared["max_workers"]
    # setup commands were merged as ray up merges them (common first)
    assert prepared["worker_setup_commands"][:len(config["setup_commands"])] == config["setup_commands"]


def test_head_takes_no_training_and_workers_have_gpus():
    config = load()
    types = config["available_node_types"]
    assert types["head"]["resources"].get("CPU") == 0 and types["head"]["resources"].get("GPU", 0) == 0
    assert types["head"]["max_workers"] == 0
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 4}
    for node_type in gpu_types.values():
        assert node_type["max_workers"] >= node_type.get("min_workers", 0) >= 0
    assert "--num-gpus" in " ".join(config["worker_start_ray_commands"])
    # the dashboard is not exposed: bound to localhost, reached by port-forwarding
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_gpu_workers_install_cuda_torch_and_the_gpu_extra():
    workers = " ".join(load()["worker_setup_commands"])
    torch_at = workers.index("pip install -q torch --index-url")
    assert re.search(r"whl/cu1\d\d", workers)
    assert workers.index("[gpu]") > torch_at                 # CUDA torch first, then the project
    head = " ".join(load()["head_setup_commands"])
    assert "[cpu]" in head and "[gpu]" not in head           # one FAISS build per node, never both


def test_storage_is_an_object_store_uri_and_nothing_secret():
    text = CLUSTER_YAML.read_text()
    assert re.search(r"DIFFREC_STORAGE=s3://YOUR-BUCKET/", text)
    lowered = text.lower()
    for secret in ("aws_secret_access_key", "aws_access_key_id=", "aws_session_token", "password"):
        assert secret not in lowered
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)          # an access key id
    assert not re.search(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", text)  # a secret key
    assert "ssh_private_key:" not in re.sub(r"#.*", "", text)
    for excluded in (".git", ".venv", "data"):
        assert excluded in load()["rsync_exclude"]


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(max_worker=3), jsonschema.ValidationError),                        # unknown top-level key
    (lambda c: c["available_node_types"]["gpu4"].update(gpus=4), jsonschema.ValidationError),  # unknown node key
    (lambda c: c.update(max_workers="eight"), jsonschema.ValidationError),                 # wrong type
    (lambda c: c["available_node_types"]["gpu1"]["resources"].update(GPU="1"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu1"]["resources"].update(GPU=-1), jsonschema.ValidationError),
    # a string, not a list: ray up's prepare_config already fails merging it (TypeError), as `ray up` would
    (lambda c: c.update(setup_commands="pip install ."), (TypeError, jsonschema.ValidationError)),
    (lambda c: c["available_node_types"]["gpu4"].pop("resources"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="cpu-head"), ValueError),                           # no such node type
    (lambda c: c["available_node_types"]["gpu1"].update(min_workers=9), ValueError),       # > global max_workers
])
def test_broken_copies_are_rejected(breakage, error):
    config = load()
    breakage(config)
    with pytest.raises(error):
        ray_up_checks(config)
