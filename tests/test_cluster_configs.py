"""Cluster configs: launcher YAMLs pass Ray's own schema; KubeRay manifests carry the fields
the RayCluster / RayJob CRDs require; dashboards bind to localhost; no secrets in any file."""

import copy
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = REPO / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_schema(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    # what `ray up` does: fill in the provider's defaults, then validate against the schema
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]
    workers = {k: v for k, v in config["available_node_types"].items()
               if k != config["head_node_type"]}
    assert set(workers) == {"train_gpu", "gen_gpu", "cpu_data"}
    for node_type in workers.values():  # autoscaling: each type scales from 0
        assert node_type["min_workers"] == 0 < node_type["max_workers"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["train_gpu"]["max_workers"] = "four"
    with pytest.raises(Exception, match="four"):
        validate_config(prepare_config(broken))


def _check_group(group, head=False):
    spec = group["template"]["spec"]
    assert spec["containers"] and all(c["image"] and c["name"] for c in spec["containers"])
    assert "rayStartParams" in group
    if head:
        assert group["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    else:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]


def test_kuberay_raycluster_fields():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    _check_group(spec["headGroupSpec"], head=True)
    for group in spec["workerGroupSpecs"]:
        _check_group(group)
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in
                  g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert {g["groupName"] for g in gpu_groups} == {"train-gpu", "gen-gpu"}


def test_kuberay_rayjob_fields_and_entrypoint():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    module, config = re.fullmatch(r"python -m (\S+) --config (\S+)", spec["entrypoint"]).groups()
    assert (REPO / Path(*module.split("."))).with_suffix(".py").exists()
    assert (REPO / config).exists()
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "."
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    _check_group(cluster["headGroupSpec"], head=True)
    for group in cluster["workerGroupSpecs"]:
        _check_group(group)


def test_runtime_env_ships_code_without_venv_or_outputs():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for excluded in (".venv/", "runs/", ".cache/"):
        assert excluded in env["excludes"]


SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"hf_[A-Za-z0-9]{20,}", r"sk-[A-Za-z0-9]{20,}",
                   r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                   r"(?i)(password|secret|token|api_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,}"]


def test_no_secrets_in_cluster_files():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for pattern in SECRET_PATTERNS:
                assert not re.search(pattern, text), f"{path}: looks like a secret ({pattern})"


# -- shared storage (issue 15): one path on every node for runs, models and data ------------------

SHARED = "/mnt/shared"


@pytest.mark.parametrize("name, fs", [("aws.yaml", "efs.us-east-1.amazonaws.com:/"),
                                      ("gcp.yaml", ":/shared")])
def test_launcher_nodes_mount_shared_storage_into_the_container(name, fs):
    config = yaml.safe_load((CLUSTER / name).read_text())
    mounts = [c for c in config["initialization_commands"] if " mount -t nfs" in c]
    assert len(mounts) == 1 and fs in mounts[0] and mounts[0].endswith(f" {SHARED}")
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    assert "run.output_dir" in (CLUSTER / name).read_text()  # says what lives there


def _pod_specs(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_mount_the_shared_volume(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    claim = yaml.safe_load((CLUSTER / "kuberay" / "pvc.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on every node mount it
    for pod in _pod_specs(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == \
            claim["metadata"]["name"]
        for container in pod["containers"]:
            assert {"name": "shared", "mountPath": SHARED} in container["volumeMounts"]


def test_rayjob_runs_a_gpu_recipe_on_the_shared_volume():
    from dqo_ray.config import load_config

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    config = re.fullmatch(r"python -m \S+ --config (\S+)", doc["spec"]["entrypoint"]).group(1)
    cfg = load_config(REPO / config)
    assert cfg.trainer.use_gpu and cfg.generation.gpus_per_engine >= 1
    pip = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["pip"]
    assert any(p.startswith("vllm==") for p in pip) and any(p.startswith("deepspeed==")
                                                            for p in pip)


@pytest.mark.parametrize("recipe", ["gsm8k-qwen2.5-1.5b.yaml", "gsm8k-qwen2.5-1.5b-2node.yaml"])
def test_gpu_recipes_keep_runs_models_and_data_on_shared_storage(recipe):
    from dqo_ray.config import load_config

    cfg = load_config(REPO / "configs" / recipe)
    for path in (cfg.run.output_dir, cfg.model.policy, cfg.task.source,
                 *cfg.eval.sources.values()):
        assert path.startswith(SHARED + "/"), path
