"""The run's plan (issue 15, deliver 2): resources per role, GPU memory, and a refusal naming the
role and the numbers when a described cluster cannot hold them; the pipeline refuses the same
run at start; the GPU recipes fit their clusters; vLLM's memory settings reach the engines."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
from conftest import REPO

from dqo_ray.capacity import CapacityWatch, shortfall
from dqo_ray.clusters import (
    Ask,
    Cluster,
    Node,
    PlanError,
    assign,
    cluster_from_ray_nodes,
    gpu_kind,
    parse_cluster,
    place,
)
from dqo_ray.config import ConfigError, load_config
from dqo_ray.model_shapes import model_shape
from dqo_ray.plan import make_plan

QWEN = "Qwen/Qwen2.5-1.5B-Instruct"  # sized from the table of known models: no download
GPU_RUN = ["trainer.use_gpu=true", "generation.gpus_per_engine=1", "eval.gpus=1",
           f"model.policy={QWEN}", "model.gradient_checkpointing=true",
           "trainer.zero_stage=2", "generation.max_model_len=1024",
           "data.max_prompt_tokens=512", "data.max_response_tokens=512"]


def plan_of(overrides: list[str], cluster: str, config: str | None = None):
    cfg = load_config(config, overrides)
    return make_plan(cfg, parse_cluster(cluster), model_shape(cfg.model))


# -- clusters ------------------------------------------------------------------------------------


def test_cluster_descriptions():
    c = parse_cluster("2x8xH100")
    assert (len(c.nodes), c.gpus, c.cpus) == (2, 16, 192)  # 12 CPUs per GPU unless stated
    assert c.nodes[0].gpu.memory_gib == 80 and c.nodes[0].gpu.bf16_tflops == 989
    assert parse_cluster("1x8xA100").nodes[0].gpu.memory_gib == 40  # the smaller part
    a100 = parse_cluster("1x8xA100-80GB:96cpu")
    assert a100.nodes[0].gpu.memory_gib == 80 and a100.cpus == 96
    assert gpu_kind("A100-80G").memory_gib == 80  # Ray's accelerator type name
    for bad, message in [("8xH100", "is not a cluster NODESxGPUSxTYPE"),
                         ("0x8xH100", "at least one node"),
                         ("1x8xMI300", "GPU type MI300 has no known memory size")]:
        with pytest.raises(PlanError, match=message):
            parse_cluster(bad)
    assert parse_cluster("1x8xMI300-192GB").nodes[0].gpu.memory_gib == 192


def test_cluster_from_the_running_rays_nodes():
    nodes = [
        {"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 0.0, "memory": 1e10}},  # a CPU-less head
        {"Alive": True, "NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2",
         "Resources": {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},
        {"Alive": False, "NodeID": "c" * 56, "Resources": {"CPU": 8.0, "GPU": 1.0}},
    ]
    cluster = cluster_from_ray_nodes(nodes)
    assert [(n.name, n.cpus, n.gpus) for n in cluster.nodes] == [
        ("10.0.0.1 (aaaaaaaaaaaa)", 0, 0), ("10.0.0.2 (bbbbbbbbbbbb)", 192, 8)]
    assert cluster.nodes[1].gpu.name == "H100" and cluster.nodes[1].gpu.memory_gib == 80


def test_nodes_sharing_a_machine_are_counted_apart():
    """Two Ray nodes on one machine (cluster/local_cluster.sh) share an address: ci-small's
    phases need 3.5 of their 2 + 2 CPUs."""
    nodes = [{"Alive": True, "NodeID": f"{c}" * 56, "NodeManagerAddress": "127.0.0.1",
              "Resources": {"CPU": 2.0}} for c in "ab"]
    cluster = cluster_from_ray_nodes(nodes)
    cfg = load_config(REPO / "configs" / "ci-small.yaml")
    plan = make_plan(cfg, cluster, model_shape(cfg.model))
    assert plan.ok and plan.overlap, plan.refusal()
    assert place(cluster, [Ask("evaluator", 1, 0, 2), Ask("trainer", 1, 0, 2)]) is None
    assert place(cluster, [Ask("trainer", 3, 0, 1.5)]) == "trainer 3 of 3 (1.5 CPUs)"


def test_placement_keeps_a_units_gpus_on_one_node():
    two = Cluster("2x4", (Node("n0", 32, 4), Node("n1", 32, 4)))
    assert place(two, [Ask("generator", 2, 4, 4)]) is None
    assert place(two, [Ask("generator", 1, 8, 8)]) == "generator 1 of 1 (8 GPUs, 8 CPUs)"
    # 3 + 3 GPUs leave 1 + 1: a 2-GPU engine does not fit although 2 GPUs are free
    assert place(two, [Ask("trainer", 2, 3, 1), Ask("generator", 1, 2, 2)]) == \
        "generator 1 of 1 (2 GPUs, 2 CPUs)"


# -- model sizes ---------------------------------------------------------------------------------


def test_model_size_from_config_json_the_table_or_unknown(tiny_checkpoint):
    cfg = load_config(None, [f"model.policy={tiny_checkpoint}"])
    shape = model_shape(cfg.model)
    assert shape.source.endswith("config.json") and shape.hidden == 64
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
               .parameters())
    assert shape.params == real  # the formula counts what transformers builds
    qwen = model_shape(load_config(None, [f"model.policy={QWEN}"]).model)
    assert qwen.source == "the table of known models"
    assert 1.53e9 < qwen.params < 1.55e9  # Qwen2.5-1.5B: 1.54B
    assert model_shape(load_config(None, ["model.policy=/models/Qwen2.5-7B-Instruct"])
                       .model).params > 7e9  # a local folder not on this machine: by its name
    assert model_shape(load_config(None, ["model.policy=org/unknown-model"]).model) is None
    plan = plan_of([*GPU_RUN, "model.policy=org/unknown-model"], "1x8xH100")
    assert plan.ok and not plan.memory
    assert any("size unknown, GPU memory not estimated" in n for n in plan.notes)


# -- fitting and refusing ------------------------------------------------------------------------


def test_a_plan_that_fits_with_overlap():
    plan = plan_of([*GPU_RUN, "trainer.num_workers=4", "generation.num_engines=3",
                    "data.ref_actors=4"], "1x8xH100-80GB")
    assert plan.ok, plan.refusal()
    assert plan.overlap
    assert "auto: the trainer, the engines and the evaluator are all held" in plan.overlap_why
    asks = plan.asks
    assert (asks["trainer"].count, asks["trainer"].gpus) == (4, 1)
    assert (asks["generator"].count, asks["generator"].gpus) == (3, 1)
    assert (asks["evaluator"].gpus, asks["reference"].gpus, asks["reference"].count) == (1, 1, 4)
    assert [a.role for a in plan.phases["run"]] == ["trainer", "ray-data", "evaluator",
                                                    "generator"]
    assert list(plan.phases) == ["run"]  # round 0 is sampled: no Ray Data reference stage
    trainer = next(m for m in plan.memory if m.role == "trainer")
    assert 10 < trainer.total < 80 and trainer.parts["optimizer"] > trainer.parts["gradients"]
    text = plan.render("t")
    assert "| trainer | 4 | 1 |" in text and "fits: yes" in text and "KV cache" in text


def test_a_plan_that_does_not_fit_names_the_role_and_numbers():
    # 8 train workers + 2 engines + the evaluator = 11 GPUs at once on 8
    plan = plan_of([*GPU_RUN, "trainer.num_workers=8", "generation.num_engines=2"], "1x8xH100")
    assert not plan.ok
    [problem] = plan.problems
    assert problem == ("phase run needs trainer 8 x (1 GPU, 0.5 CPUs) + ray-data 1 x (1 CPU) "
                       "+ evaluator 1 x (1 GPU, 1 CPU) + generator 2 x (1 GPU, 1 CPU) = 11 "
                       "GPUs, 8 CPUs at once; 1x8xH100 has 8 GPUs (at most 8 on a node), 96 "
                       "CPUs: no node has room for trainer 6 of 8 (1 GPU, 0.5 CPUs)")
    assert plan.refusal() == "plan refused: " + problem
    assert "fits: no (1 problem(s))" in plan.render()


def test_memory_that_does_not_fit_is_refused_with_its_parts():
    plan = plan_of([*GPU_RUN, "model.policy=Qwen/Qwen2.5-7B-Instruct", "trainer.zero_stage=1",
                    "model.gradient_checkpointing=false", "trainer.num_workers=4"],
                   "1x8xH100")
    problem = plan.problems[0]
    assert problem.startswith("trainer: needs about ")
    assert "more than the 80 GiB of an H100: raise trainer.zero_stage" in problem
    for part in ("weights", "gradients", "optimizer", "activations", "logits"):
        assert part in problem
    # ZeRO 3 over 4 workers and gradient checkpointing bring it under 80 GiB; pi_ref (14 GiB
    # in bf16) needs more of the engines' GPUs than vLLM's 0.85 leaves
    assert plan.problems[1].startswith("reference: needs about 20.3 GiB")
    assert plan_of([*GPU_RUN, "model.policy=Qwen/Qwen2.5-7B-Instruct", "trainer.zero_stage=3",
                    "trainer.num_workers=4", "trainer.micro_batch_size=2",
                    "generation.gpu_memory_utilization=0.7"], "1x8xH100").ok


def test_an_engine_whose_kv_cache_cannot_hold_one_sequence_is_refused():
    plan = plan_of([*GPU_RUN, "model.policy=Qwen/Qwen2.5-7B-Instruct",
                    "generation.gpu_memory_utilization=0.7", "trainer.num_workers=1",
                    "trainer.zero_stage=3", "generation.max_model_len=null"], "1x4xL4")
    generator, evaluator = [p for p in plan.problems if p.startswith(("generator", "evaluator"))]
    assert generator.startswith(
        "generator: vLLM's share of an L4 is 16.8 GiB (generation.gpu_memory_utilization 0.7 "
        "x 24 GiB) and its KV cache holds ")
    assert "less than one sequence of max_model_len 32,768 tokens (weights 14.2 GiB)" in generator
    assert evaluator.startswith("evaluator: vLLM's share of an L4 is 16.8 GiB")
    tight = plan_of([*GPU_RUN, "model.policy=Qwen/Qwen2.5-7B-Instruct",
                     "generation.gpu_memory_utilization=0.5"], "1x4xL4")
    assert any("and the weights and activations take all of it" in p for p in tight.problems)
    # a shorter max_model_len fits in the same KV cache
    assert not any(p.startswith("generator") for p in plan_of(
        [*GPU_RUN, "model.policy=Qwen/Qwen2.5-7B-Instruct",
         "generation.gpu_memory_utilization=0.7"], "1x4xL4").problems)


def test_the_trainer_engines_and_evaluator_must_fit_at_once_whatever_overlap_says():
    """4 workers + 4 engines + the evaluator = 9 GPUs: the trainer lives for the whole run,
    so no setting of pipeline.overlap makes them take turns on 8."""
    overrides = [*GPU_RUN, "trainer.num_workers=4", "generation.num_engines=4",
                 "data.ref_actors=4"]
    for mode in ("auto", "off"):
        plan = plan_of([*overrides, f"pipeline.overlap={mode}"], "1x8xH100")
        assert not plan.ok and plan.overlap == (mode == "auto")
        assert plan.problems[0].startswith("phase run needs trainer 4 x (1 GPU")
    # round 0 ingested: the Ray Data reference stage runs before the trainer starts
    ingest = plan_of([*GPU_RUN, "pipeline.round0=ingest", "pipeline.ingest_source=x.jsonl",
                      "trainer.num_workers=4", "generation.num_engines=3",
                      "data.ref_actors=4"], "1x8xH100")
    assert ingest.ok and list(ingest.phases) == ["reference", "run"]
    # a CPU-only pool is counted in the run phase
    cpu = plan_of(["pipeline.overlap=off"], "1x8xH100")
    assert "generator" in [a.role for a in cpu.phases["run"]]


def test_pi_ref_must_fit_beside_vllm_on_an_engine_gpu():
    plan = plan_of([*GPU_RUN, "model.policy=Qwen/Qwen2.5-7B-Instruct", "trainer.zero_stage=3",
                    "trainer.num_workers=4", "trainer.micro_batch_size=2",
                    "generation.gpu_memory_utilization=0.9", "data.ref_batch_size=16"],
                   "1x8xH100")
    [problem] = [p for p in plan.problems if p.startswith("reference")]
    assert "more than the 8 GiB left beside vLLM on an H100" in problem
    assert "lower data.ref_batch_size or generation.gpu_memory_utilization" in problem


def test_tensor_parallel_engines_need_their_gpus_on_one_node():
    plan = plan_of([*GPU_RUN, "trainer.num_workers=2", "generation.gpus_per_engine=4",
                    "generation.num_engines=2", "data.ref_actors=2"], "2x4xH100")
    assert not plan.ok  # a 4-GPU engine fills a node: nothing else fits beside two of them
    assert plan.asks["generator"].unit() == "4 GPUs, 4 CPUs"
    assert plan_of([*GPU_RUN, "trainer.num_workers=1", "generation.gpus_per_engine=2",
                    "generation.num_engines=1", "data.ref_actors=2"], "1x4xH100").ok


# -- the command, the recipes, and the pipeline's start check --------------------------------------


@pytest.mark.parametrize("recipe, cluster", [("gsm8k-qwen2.5-1.5b.yaml", "1x8xH100-80GB"),
                                             ("gsm8k-qwen2.5-1.5b-2node.yaml", "2x8xH100-80GB")])
def test_gpu_recipes_fit_their_clusters(recipe, cluster, capsys):
    from jobs import plan as plan_job

    path = str(REPO / "configs" / recipe)
    cfg = load_config(path)
    assert cfg.ray.cluster == cluster  # what the pipeline checks at start
    assert (cfg.model.dtype, cfg.trainer.engine, cfg.model.gradient_checkpointing) == (
        "bfloat16", "deepspeed", True)
    assert cfg.trainer.zero_stage >= 1 and cfg.trainer.use_gpu
    g = cfg.generation
    assert g.chunk_prompts * g.samples_per_prompt >= g.max_num_seqs  # fills an engine
    assert plan_job.main(["--config", path]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "overlap: on" in out
    plan = plan_of([], cluster, path)
    used = sum(a.count * a.gpus for a in plan.phases["run"])
    assert used == plan.cluster.gpus  # every GPU has work while training
    assert not plan.notes or all("queue" not in n and "fill" not in n for n in plan.notes)


def test_plan_command_refuses_with_exit_code_2(capsys):
    from jobs import plan as plan_job

    args = [a for o in [*GPU_RUN, "trainer.num_workers=8"] for a in ("--set", o)]
    assert plan_job.main([*args, "--cluster", "1x8xH100"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("plan refused: phase run needs trainer 8 x (1 GPU")
    assert "no node has room for trainer 7 of 8" in captured.err
    assert "fits: no" in captured.out
    assert plan_job.main([*args]) == 2
    assert "no cluster to plan for: give --cluster" in capsys.readouterr().err
    assert plan_job.main([*args, "--cluster", "8xH100"]) == 2
    assert "'8xH100' is not a cluster" in capsys.readouterr().err


def test_pipeline_refuses_the_same_plan_before_starting_anything(tmp_path, capsys,
                                                                   monkeypatch):
    from jobs import pipeline
    from jobs import plan as plan_job

    started = []
    monkeypatch.setattr(pipeline, "init_ray", lambda *a, **k: started.append("ray"))
    sets = [*GPU_RUN, "trainer.num_workers=8", f"run.output_dir={tmp_path}"]
    args = [a for o in sets for a in ("--set", o)]
    assert plan_job.main([*args, "--cluster", "1x8xH100"]) == 2
    refused = capsys.readouterr().err
    assert pipeline.main([*args, "--set", "ray.cluster=1x8xH100"]) == 2
    assert capsys.readouterr().err == refused
    assert not started and not any(tmp_path.iterdir())  # neither Ray nor the run folder


def test_pipeline_starts_one_trainer_and_feeds_it_round_by_round(monkeypatch, tmp_path):
    """The driver's order: one trainer, started before round 0 is sampled (its workers load
    while the engines sample); each round's epoch planned as soon as its data is stored;
    round r+1 sampled while round r trains, refreshed from the trainer's weights in memory;
    the trainer closed at the end."""
    from dqo_ray.run_state import RunState
    from jobs import pipeline

    cfg = load_config(None, ["pipeline.rounds=3", f"run.output_dir={tmp_path}",
                             "pipeline.evaluate_start=false"])
    events: list[str] = []
    sampled: dict[int, str] = {}

    class FakeTrainer:
        def __init__(self, cfg, policy, run_dir, latest_checkpoint=None, rounds=1):
            events.append(f"trainer from {policy}")

        def start(self):
            events.append("start")

        def prepare(self, r, rounds):
            events.append(f"prepare {r} on {rounds}")

        def train_round(self, r, rounds):
            assert f"data {r}" in events[-3:] or r in sampled  # its data is there
            events.append(f"train {r}")
            return types.SimpleNamespace(checkpoint=f"ckpt{r}", policy=f"ckpt{r}/policy",
                                         metrics={}, weights=f"weights{r}")

        def close(self):
            events.append("closed")

        def starts(self):
            return 1

    p = pipeline.Pipeline(cfg, RunState(cfg.run.run_dir, {}),
                          make_plan(cfg, parse_cluster("1x8xH100"), None))
    monkeypatch.setattr(pipeline, "RoundTrainer", FakeTrainer)
    monkeypatch.setattr(p, "start_policy", lambda: "start")
    monkeypatch.setattr(p, "start_evaluator", lambda: None)
    monkeypatch.setattr(p, "watch", lambda: None)
    monkeypatch.setattr(p, "finish", lambda: events.append("finish"))
    monkeypatch.setattr(p, "reference", lambda r, start: None)
    monkeypatch.setattr(pipeline, "round_breakdown", lambda *a: {"rounds": [
        dict.fromkeys(["steps", "start", "checkpoint", "other", "sampling", "exposed",
                       "refresh"], 0) | {"round": r} for r in range(3)]})

    def data(r, policy, weights=None):
        if r in sampled:
            return
        sampled[r] = f"{policy} ({weights or 'no weights'})"
        if r == 0:
            events.append("data 0")
        p.state.finish(f"round{r}/data", 0.0)

    monkeypatch.setattr(p, "data", data)
    p.run()
    # (round r+1's epoch is planned by the background sampling as soon as its data is in)
    assert [e for e in events if not e.startswith("prepare")] == [
        "trainer from start", "start", "data 0", "train 0", "start", "train 1", "start",
        "train 2", "closed", "finish"]
    for r in (1, 2):  # planned after round r-1 began training, before round r trains
        assert (events.index(f"train {r - 1}") - 1 <= events.index(f"prepare {r} on "
                                                                  f"{list(range(r + 1))}")
                < events.index(f"train {r}"))
    assert events.index("prepare 0 on [0]") < events.index("train 0")
    # round r+1 sampled while round r trained, from round r's start policy; from round 1 on
    # the engines take the trainer's weights from memory
    assert sampled == {0: "start (no weights)", 1: "start (no weights)",
                       2: "ckpt0/policy (weights0)"}
    assert p.state.finished("round2/train")["checkpoint"] == "ckpt2"


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["ray.cluster=8xH100"], "ray.cluster: '8xH100' is not a cluster"),
    (["generation.gpu_memory_utilization=1.5"], "generation.gpu_memory_utilization: 1.5 must be "
                                                "<= 0.98"),
    (["generation.max_num_seqs=0"], "generation.max_num_seqs: 0 must be >= 1"),
    (["generation.max_model_len=600", "data.max_prompt_tokens=512",
      "generation.max_new_tokens=256", "eval.max_new_tokens=256"],
     "generation.max_model_len: 600 is shorter than the longest sequence an engine is given "
     "(768 = data.max_prompt_tokens + generation.max_new_tokens, eval.max_new_tokens)"),
    (["model.attn_implementation=flash"], "model.attn_implementation: 'flash' is not one of"),
    (["run.output_dir=s3://bucket/runs"], "run.output_dir: 's3://bucket/runs' is a URI"),
    (["pipeline.cache_dir=gs://bucket/cache"], "pipeline.cache_dir: 'gs://bucket/cache' is a "
                                               "URI"),
])
def test_new_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_vllm_memory_settings_reach_llm_arguments():
    from actors.engines.vllm_engine import llm_arguments

    cfg = load_config(None, ["generation.gpu_memory_utilization=0.8",
                             "generation.max_model_len=2048", "generation.max_num_seqs=256"])
    gpu = llm_arguments("m", "auto", 0, 1, on_cpu=False, **cfg.generation.vllm_memory)
    assert (gpu["gpu_memory_utilization"], gpu["max_model_len"], gpu["max_num_seqs"]) == (
        0.8, 2048, 256)
    cpu = llm_arguments("m", "auto", 0, 1, on_cpu=True, **cfg.generation.vllm_memory)
    assert "gpu_memory_utilization" not in cpu  # VLLM_CPU_KVCACHE_SPACE there
    assert (cpu["max_model_len"], cpu["max_num_seqs"]) == (2048, 256)
    unset = llm_arguments("m", "auto", 0, 1, on_cpu=False,
                          **load_config(None).generation.vllm_memory)
    assert unset["gpu_memory_utilization"] == 0.85  # said out loud: pi_ref has the rest
    assert "max_model_len" not in unset and "max_num_seqs" not in unset


def test_engines_and_evaluator_get_the_vllm_memory_settings(tmp_path, tiny_checkpoint,
                                                           monkeypatch):
    from actors import evaluator, generator
    from actors.engines import factory, vllm_engine

    made = []
    monkeypatch.setattr(generator, "make_engine", lambda kind, path, **kw: made.append(kw))
    monkeypatch.setattr(evaluator, "make_engine", lambda kind, path, **kw: made.append(kw))
    cfg = load_config(None, ["generation.gpu_memory_utilization=0.7",
                             "generation.max_model_len=1024", "generation.max_num_seqs=64",
                             "eval.datasets=[tinymath]", "eval.limit=2",
                             f"run.output_dir={tmp_path}"])
    generator.EngineWorker(cfg, str(tiny_checkpoint))
    evaluator.Evaluator(cfg, str(tiny_checkpoint), cfg.run.run_dir)
    want = {"gpu_memory_utilization": 0.7, "max_model_len": 1024, "max_num_seqs": 64}
    assert [{k: m[k] for k in want} for m in made] == [want, want]

    class Captured(Exception):
        pass

    def fake_vllm(path, **kwargs):
        raise Captured(json.dumps({k: kwargs[k] for k in want}))

    monkeypatch.setattr(vllm_engine, "VLLMEngine", fake_vllm)
    monkeypatch.setattr(factory, "vllm_importable", lambda: True)
    with pytest.raises(Captured) as info:  # make_engine hands them to the vLLM engine
        factory.make_engine("vllm", str(tiny_checkpoint), cuda=False, **want)
    assert json.loads(str(info.value)) == want


def test_plan_runs_without_ray_imported():
    import subprocess

    code = ("import sys; import dqo_ray.plan, jobs.plan; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.stdout.strip() == "False"


def test_bare_on_and_off_in_yaml_are_the_overlap_modes(tmp_path):
    """YAML 1.1 reads `overlap: on` as True: it means "on", not an error."""
    for word in ("on", "off"):
        path = tmp_path / f"{word}.yaml"
        path.write_text(f"pipeline:\n  overlap: {word}\n")
        assert load_config(path).pipeline.overlap == word
    with pytest.raises(ConfigError, match="trainer.use_gpu: 'on' is not bool"):
        load_config(None, ["trainer.use_gpu='on'"])


def test_capacity_watch_names_a_lost_node_waits_and_gives_up_after_resource_wait_s(caplog):
    cfg = load_config("configs/gsm8k-qwen2.5-1.5b-2node.yaml", ["ray.resource_wait_s=100"])
    plan = make_plan(cfg, parse_cluster("2x8xH100-80GB"), model_shape(cfg.model))
    assert plan.ok
    now = {"cluster": parse_cluster("2x8xH100-80GB")}
    gave_up = []
    watch = CapacityWatch(cfg, plan, lambda: now["cluster"], lambda: gave_up.append(True))
    assert watch.check(0.0) is None  # both nodes there: nothing to say

    now["cluster"] = parse_cluster("1x8xH100-80GB")  # a node preempted
    first = watch.check(10.0)
    assert first.startswith("waiting for resources (0s so far): ")
    assert "1 node(s), 8 GPUs" in first and "giving up after 100s" in first
    assert shortfall(cfg, plan, now["cluster"]) in first
    assert [watch.check(t) for t in range(11, 20)] == [None] * 9  # then every tenth check
    assert watch.check(20.0).startswith("waiting for resources (10s so far)")

    now["cluster"] = parse_cluster("2x8xH100-80GB")  # the replacement node joined
    assert watch.check(30.0).startswith("the cluster holds the run again: ")
    now["cluster"] = parse_cluster("1x8xH100-80GB")
    watch.check(40.0)
    assert not gave_up and watch.failure is None
    failure = watch.check(140.0)
    assert gave_up == [True] and failure == watch.failure
    assert failure.startswith("the cluster could not hold this run for 100s "
                              "(ray.resource_wait_s=100): ")
    assert failure.endswith("Re-submit the same command to resume.")


def test_capacity_watch_sees_a_cpu_node_lost_from_the_local_test_cluster():
    """ci-small on two 2-CPU Ray nodes (cluster/local_cluster.sh) needs 3.5 CPUs at once."""
    def nodes(n: int) -> Cluster:
        return cluster_from_ray_nodes([{"Alive": True, "NodeID": f"{c}" * 56,
                                        "NodeManagerAddress": "127.0.0.1",
                                        "Resources": {"CPU": 2.0}} for c in "ab"[:n]])

    cfg = load_config(REPO / "configs" / "ci-small.yaml")
    plan = make_plan(cfg, nodes(2), model_shape(cfg.model))
    assert plan.ok and plan.overlap and shortfall(cfg, plan, nodes(2)) is None
    assert shortfall(cfg, plan, nodes(1)) == "; ".join(
        make_plan(cfg, nodes(1), model_shape(cfg.model)).problems)
    assert "CPU" in shortfall(cfg, plan, nodes(1))


def test_capacity_watch_logs_and_records_the_nodes_that_come_and_go(tmp_path, caplog):
    from dqo_ray.capacity import NODES_FILE
    from dqo_ray.evaluation.report import write_pipeline_summary
    from dqo_ray.io import read_jsonl

    def nodes(*names: str) -> Cluster:
        return cluster_from_ray_nodes([{"NodeID": "f" * 44 + f"{i:012d}", "NodeManagerAddress":
                                        "10.0.0.1", "Resources": {"CPU": 2.0, name: 2.0}}
                                       for i, name in enumerate(names)])

    cfg = load_config(REPO / "configs" / "ci-small.yaml")
    plan = make_plan(cfg, nodes("head"), model_shape(cfg.model))
    watch = CapacityWatch(cfg, plan, lambda: nodes("head"), lambda: None, tmp_path)
    assert watch.note_nodes(nodes("head")) == []  # the first look: what is there, not logged
    came = watch.note_nodes(nodes("head", "dqo_trainer"))
    assert came == ["node came: 10.0.0.1 (000000000001) (2 CPU, 2 dqo_trainer), 0s after start"]
    assert watch.note_nodes(nodes("head", "dqo_trainer")) == []
    left = watch.note_nodes(nodes("head"))
    assert left == ["node left: 10.0.0.1 (000000000001) (2 CPU, 2 dqo_trainer), 0s after start"]
    assert [(r["event"], r["node"]) for r in read_jsonl(tmp_path / NODES_FILE)] == [
        ("present", "10.0.0.1 (000000000000)"), ("came", "10.0.0.1 (000000000001)"),
        ("left", "10.0.0.1 (000000000001)")]
    summary = write_pipeline_summary(tmp_path, {}, []).read_text()
    assert "## Nodes" in summary and "| came | 10.0.0.1 (000000000001) | 2 CPU, 2 dqo_trainer |" \
        in summary


def test_the_two_node_recipe_keeps_its_trainer_group_on_one_node():
    """trainer.placement: strict_pack (issue 27, item 2): the plan places all 8 workers on one
    node and shows where every role goes; a group larger than a node is refused."""
    cfg = load_config(REPO / "configs" / "gsm8k-qwen2.5-1.5b-2node.yaml")
    assert cfg.trainer.placement == "strict_pack"
    cluster = parse_cluster("2x8xH100-80GB")
    plan = make_plan(cfg, cluster, model_shape(cfg.model))
    assert plan.ok
    placed, failed = assign(cluster, plan.phases["run"])
    assert failed is None and ["trainer x8" in roles for roles in placed].count(True) == 1
    assert "- node0: trainer x8, ray-data" in plan.render()
    assert "- node1: evaluator, generator x7" in plan.render()

    wide = load_config(REPO / "configs" / "gsm8k-qwen2.5-1.5b-2node.yaml",
                       ["trainer.num_workers=9", "generation.num_engines=6"])
    refused = make_plan(wide, cluster, model_shape(wide.model))
    assert not refused.ok
    assert "no node has room for trainer: all 9 x (1 GPU, 8 CPUs) on one node" in \
        refused.problems[0]
    # pack (the default) may split the group: the same 9 workers fit over the two nodes
    loose = load_config(REPO / "configs" / "gsm8k-qwen2.5-1.5b-2node.yaml",
                        ["trainer.num_workers=9", "generation.num_engines=6",
                         "trainer.placement=pack"])
    assert make_plan(loose, cluster, model_shape(loose.model)).ok
