"""The shipped cluster files can hold what `jobs.plan` asks for (issue 26, item 4): for each GPU
recipe, every phase's bundles are placed (first fit, the plan's own `place`) on the largest
cluster each file lets the autoscaler make (`dqo_ray.clusters.cluster_from_file`: every worker
type at its maximum count, with the resources the file gives it), with the roles' markers
(ray.role_resources: dqo_trainer, dqo_generator, dqo_evaluator) and without."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dqo_ray.clusters import ROLE_RESOURCES, PlanError, cluster_from_file, parse_cluster, place
from dqo_ray.config import load_config
from dqo_ray.plan import phases

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("gsm8k-*.yaml"))
FILES = ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/raycluster.yaml"]
CLUSTERS = {name: cluster_from_file(REPO / name) for name in FILES}


def test_there_are_recipes_and_the_files_have_gpu_nodes():
    assert len(RECIPES) >= 2
    for name, cluster in CLUSTERS.items():
        assert cluster.gpus >= 16, name  # room for the 2-node recipe's 16 GPUs
        # every role's marker is declared by some node type
        declared = {r for n in cluster.nodes for r in n.resources}
        assert set(ROLE_RESOURCES.values()) <= declared, name


def test_launcher_types_fit_under_the_cluster_cap():
    for name in FILES[:2]:
        spec = yaml.safe_load((REPO / name).read_text())
        workers = [t["max_workers"] for n, t in spec["available_node_types"].items()
                   if n != spec["head_node_type"]]
        assert sum(workers) <= spec["max_workers"], name  # all types at their maxima at once


@pytest.mark.parametrize("role_resources", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("cluster_file", FILES)
def test_every_phase_of_every_recipe_fits_the_cluster_files(recipe, cluster_file,
                                                              role_resources):
    cfg = load_config(str(REPO / recipe))
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray,
                                                           role_resources=role_resources))
    for phase, asks in phases(cfg).items():
        unplaced = place(CLUSTERS[cluster_file], asks)
        assert unplaced is None, (f"{recipe}, phase {phase}: {cluster_file} has no room for "
                                  f"{unplaced}")


def test_the_one_node_rayjob_holds_the_one_node_recipe_with_role_markers():
    cfg = load_config(str(REPO / "configs" / "gsm8k-qwen2.5-1.5b.yaml"))
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, role_resources=True))
    rayjob = cluster_from_file(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    for asks in phases(cfg).values():
        assert place(rayjob, asks) is None


def test_a_role_marker_no_node_declares_is_refused_but_a_description_ignores_it(tmp_path):
    cfg = load_config(str(REPO / "configs" / "gsm8k-qwen2.5-1.5b.yaml"))
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, role_resources=True))
    bare = tmp_path / "bare.yaml"  # aws.yaml's shapes without the markers
    spec = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    for t in spec["available_node_types"].values():
        t["resources"] = {k: v for k, v in t["resources"].items() if not k.startswith("dqo_")}
    bare.write_text(yaml.safe_dump(spec))
    assert place(parse_cluster(str(bare)), phases(cfg)["run"]) == \
        "trainer 1 of 4 (1 GPU, 8 CPUs, 1 dqo_trainer)"
    assert place(parse_cluster("1x8xH100-80GB"), phases(cfg)["run"]) is None


def test_a_file_that_is_no_cluster_file_is_named(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("just: a mapping\n")
    with pytest.raises(PlanError, match=r"other.yaml: neither a Ray cluster launcher file"):
        parse_cluster(str(path))
    with pytest.raises(PlanError, match=r"missing.yaml: cannot read it"):
        parse_cluster(str(Path(tmp_path / "missing.yaml")))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("cluster_file", FILES)
def test_the_files_give_trainer_nodes_the_disk_the_plan_asks(recipe, cluster_file):
    """Issue 27: the plan's disk per trainer node (one checkpoint of scratch + the image) fits
    the volume each file gives the node types that can hold the trainer."""
    from dqo_ray.model_shapes import model_shape
    from dqo_ray.plan import make_plan

    cfg = load_config(str(REPO / recipe))
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, role_resources=True))
    plan = make_plan(cfg, CLUSTERS[cluster_file], model_shape(cfg.model))
    assert plan.disk is not None and not [p for p in plan.problems if p.startswith("disk")]
    trainer_nodes = [n for n in CLUSTERS[cluster_file].nodes if "dqo_trainer" in n.resources]
    assert trainer_nodes and all(n.disk_gb >= plan.disk.trainer_node_gb for n in trainer_nodes)


def test_disk_per_checkpoint_counts_both_models_and_a_small_volume_is_refused(tmp_path):
    from dqo_ray.model_shapes import model_shape
    from dqo_ray.plan import make_plan
    from dqo_ray.plan_disk import NODE_BASE_GB, disk_needs

    cfg = load_config(str(REPO / "configs" / "gsm8k-qwen2.5-1.5b.yaml"))
    shape = model_shape(cfg.model)
    disk = disk_needs(cfg, shape)  # bf16: weights 2 + optimizer 12 + HF export 2 bytes
    assert disk.checkpoint_gb == pytest.approx(16 * (shape.params + shape.backbone_params) / 1e9)
    assert 40 < disk.checkpoint_gb < 60 and disk.kept == 2 * cfg.trainer.num_to_keep
    assert disk.trainer_node_gb == pytest.approx(disk.checkpoint_gb + NODE_BASE_GB)

    small = tmp_path / "small.yaml"
    spec = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    spec["available_node_types"]["train_gpu"]["node_config"]["BlockDeviceMappings"][0]["Ebs"][
        "VolumeSize"] = 80
    spec["available_node_types"]["gen_gpu"]["max_workers"] = 0
    small.write_text(yaml.safe_dump(spec))
    plan = make_plan(cfg, parse_cluster(str(small)), shape)
    assert any(p.startswith(f"disk: a trainer node needs about {disk.trainer_node_gb:.0f} GB")
               and "train_gpu-0 has 80 GB" in p for p in plan.problems), plan.problems
