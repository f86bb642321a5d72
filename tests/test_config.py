"""Typed configuration: every kind of bad input fails with a specific, named message."""

import dataclasses

import pytest
import yaml

from dqo_ray.config import (
    AlgoConfig,
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_resolved,
    validate,
)


def problems_of(raw):
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return info.value.problems


def test_defaults_are_valid_and_match_the_algorithm_doc():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.algo.lam, cfg.algo.off_policy, cfg.algo.reduction) == (1.0, "truncated", "token")
    assert cfg.algo.truncated_response == "zero"


@pytest.mark.parametrize("raw, message", [
    ({"trainer": {"zero_stage": 5}}, "trainer.zero_stage: 5 is not one of 0, 1, 2, 3"),
    ({"trainer": {"zero_stage": True}}, "trainer.zero_stage: True is not one of 0, 1, 2, 3"),
    ({"trainer": {"zerostage": 1}},
     "trainer.zerostage: unknown key (did you mean 'zero_stage'?); allowed keys: num_workers"),
    ({"trainer": {"policy_lr": "fast"}}, "trainer.policy_lr: 'fast' is not float"),
    ({"trainer": {"num_workers": 1.5}}, "trainer.num_workers: 1.5 is not int"),
    ({"trainer": {"num_workers": 0}}, "trainer.num_workers: 0 must be >= 1"),
    ({"algo": {"lam": 1.5}}, "algo.lam: 1.5 must be <= 1"),
    ({"algo": {"beta": 0}}, "algo.beta: 0.0 must be > 0"),
    ({"algo": {"kl_coef": -1}}, "algo.kl_coef: -1.0 must be >= 0"),
    ({"data": {"prompt_groups": "mixed"}},
     "data.prompt_groups: 'mixed' is not one of 'all', 'balanced'"),
    ({"pipeline": {"warm_start": {"flip_subtractions": 1.5}}},
     "pipeline.warm_start.flip_subtractions: 1.5 must be <= 1"),
    ({"task": {"name": "gsm8k"}, "pipeline": {"warm_start": {"flip_subtractions": 0.5}}},
     "pipeline.warm_start.flip_subtractions: only for task.name 'tinymath' (got 'gsm8k')"),
    ({"task": {"name": "math"}, "pipeline": {"warm_start": {"drop_answer_line": 0.5}}},
     "pipeline.warm_start.drop_answer_line: only for task.name 'tinymath' (got 'math')"),
    ({"algo": {"step_values": "mc"}, "generation": {"process_reward_alpha": 0.0}},
     "algo.step_values: 'mc' needs generation.process_reward_samples > 0"),
    ({"algo": {"step_values": "mc"}, "generation": {"process_reward_samples": 2}},
     "generation.process_reward_alpha: must be 0 with algo.step_values 'mc'"),
    ({"algo": {"step_values": "mc", "truncated_response": "bootstrap"},
      "generation": {"process_reward_samples": 2, "process_reward_alpha": 0.0}},
     "algo.truncated_response: 'bootstrap' needs a value model"),
    ({"algo": {"step_values": "value"}}, "algo.step_values: 'value' is not one of 'model', 'mc'"),
    ({"algo": {"off_policy": "retrace"}},
     "algo.off_policy: 'retrace' is not one of 'none', 'truncated', 'sequence'"),
    ({"algo": {"name": "ppo"}}, "algo.name: 'ppo' is not one of 'dqo', 'rft', 'dpo', 'dro'"),
    ({"task": {"name": "chess"}},
     "task.name: 'chess' is not one of 'gsm8k', 'math', 'math500', 'tinymath'"),
    ({"eval": {"datasets": ["gsm8k", "chess"]}}, "eval.datasets[1]: 'chess' is not one of"),
    ({"grading": {"workers": 0}}, "grading.workers: 0 must be >= 1"),
    ({"grading": {"timeout_s": 0}}, "grading.timeout_s: 0.0 must be > 0"),
    ({"model": {"gradient_checkpointing": "yes"}},
     "model.gradient_checkpointing: 'yes' is not bool"),
    ({"ray": {"address": 3}}, "ray.address: 3 is not str or null"),
    ({"data": {"rounds": [0, "x"]}}, "data.rounds[1]: 'x' is not int"),
    ({"data": {"round_weights": {"a": 1.0}}}, "data.round_weights: key 'a' is not a round number"),
    ({"trainer": 3}, "trainer: expected a mapping of keys, got 3"),
    ({"trainr": {}}, "trainr: unknown key (did you mean 'trainer'?)"),
    ({"trainer": {"warmup_steps": 10, "max_steps": 10}},
     "trainer.warmup_steps: 10 must be < trainer.max_steps (10)"),
    ({"trainer": {"value_warmup_steps": 12, "max_steps": 10}},
     "trainer.value_warmup_steps: 12 must be < trainer.max_steps (10), or the policy never"),
    ({"model": {"tiny_hidden_size": 30, "tiny_heads": 4}},
     "model.tiny_hidden_size: 30 is not divisible by model.tiny_heads (4)"),
    ({"model": {"tiny_hidden_size": 64, "tiny_heads": 4}},
     "model.tiny_hidden_size / model.tiny_heads = 16 is not a head size vLLM supports"),
])
def test_bad_values_name_key_value_and_what_is_allowed(raw, message):
    problems = problems_of(raw)
    assert any(p.startswith(message) for p in problems), problems


def test_all_problems_reported_at_once():
    problems = problems_of({"trainer": {"zero_stage": 9, "max_steps": -1}, "algo": {"lam": 2}})
    assert len(problems) == 3


def test_a_section_changed_in_code_is_checked_by_the_same_rules():
    section = Config().pipeline.warm_start
    validate(section, "pipeline.warm_start")
    with pytest.raises(ConfigError) as info:
        validate(dataclasses.replace(section, steps=0, flip_subtractions=2.0),
                 "pipeline.warm_start")
    assert info.value.problems == ["pipeline.warm_start.steps: 0 must be >= 1",
                                   "pipeline.warm_start.flip_subtractions: 2.0 must be <= 1"]
    with pytest.raises(ConfigError, match="trainer.zero_stage: 5 is not one of"):
        validate(dataclasses.replace(Config().trainer, zero_stage=5), "trainer")


def test_float_fields_accept_yaml_scientific_strings_and_ints():
    cfg = from_dict(yaml.safe_load("trainer:\n  policy_lr: 1e-5\n  value_lr: 1\n"))
    assert cfg.trainer.policy_lr == 1e-5 and isinstance(cfg.trainer.value_lr, float)


def test_file_overrides_and_resolved_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n  name: t\nalgo:\n  lam: 0.5\ndata:\n  round_weights: {0: 0.5}\n")
    cfg = load_config(path, ["trainer.policy_lr=1e-5", "algo.off_policy=sequence",
                             "ray.address=null"])
    assert cfg.trainer.policy_lr == 1e-5 and cfg.algo.off_policy == "sequence"
    assert cfg.algo.lam == 0.5 and cfg.data.round_weights == {"0": 0.5}
    written = save_resolved(cfg, tmp_path / "run")
    assert written.name == "config.resolved.yaml"
    assert load_config(written) == cfg
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_errors_name_the_file_and_the_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  zero_stage: 4\n")
    with pytest.raises(ConfigError, match=r"invalid configuration \(.*bad\.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"with --set trainer.zero_stage=7\):\n  trainer."
                                          r"zero_stage: 7 is not one of"):
        load_config(None, ["trainer.zero_stage=7"])
    with pytest.raises(ConfigError, match=r"--set 'trainer\.zero_stage': expected key.path=value"):
        load_config(None, ["trainer.zero_stage"])
    with pytest.raises(ConfigError, match=r"--set 'algo.lam.x=1': algo.lam is 0.5, not a section"):
        apply_overrides({"algo": {"lam": 0.5}}, ["algo.lam.x=1"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("trainer: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml\):\n  not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_default_and_a_supported_type():
    """Guards the validator: a new field with an unsupported type fails here, not at a user."""
    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                walk(f.type, prefix + f.name + ".")
    walk(Config, "")
    raw = dataclasses.asdict(Config())
    assert from_dict(raw) == Config()
    assert dataclasses.asdict(AlgoConfig()) == raw["algo"]


def test_command_line_arguments(tmp_path):
    import argparse

    from dqo_ray.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  beta: 0.2\n")
    args = parser.parse_args(["--config", str(path), "--set", "algo.lam=0.5",
                              "--set", "trainer.zero_stage=2"])
    cfg = config_from_args(args)
    assert (cfg.algo.beta, cfg.algo.lam, cfg.trainer.zero_stage) == (0.2, 0.5, 2)


def test_store_defaults_to_the_run_folder():
    assert load_config(None, ["run.output_dir=/x", "run.name=a"]).store == "/x/a/store"
    assert load_config(None, ["data.store=s3://b/s"]).store == "s3://b/s"
    # Two demo runs under different names never read each other's samples.
    assert load_config("configs/demo.yaml", ["run.name=demo2"]).store == "runs/demo2/store"
