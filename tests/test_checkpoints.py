"""What the engines and the evaluator load (issue 15, deliver 5): the HF export is written in
the training dtype (bf16 on GPUs) whatever the engine keeps as master weights, and says so in
config.json; plus the attention kernel setting (model.attn_implementation) the recipes use."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dqo_ray.config import load_config
from dqo_ray.device import EngineUnavailable, resolve_attn_implementation


def _dtypes(folder) -> set[str]:
    out = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            out |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return out


def test_bf16_export_from_fp32_master_weights(tiny_checkpoint, tmp_path):
    from dqo_ray.models import load_policy, load_value
    from dqo_ray.train.loop import export_hf
    from dqo_ray.train.train_engine import TorchTrainEngine

    tcfg = load_config(None).trainer
    policy = TorchTrainEngine(load_policy(tiny_checkpoint), 1e-3, tcfg, bf16=True)
    value = TorchTrainEngine(load_value(None, tiny_checkpoint), 1e-3, tcfg, bf16=True)
    assert {p.dtype for p in policy.module.parameters()} == {torch.float32}  # master weights
    export_hf(policy, tmp_path / "policy", 0, str(tiny_checkpoint), torch.bfloat16)
    export_hf(value, tmp_path / "value", 0, None, torch.bfloat16)
    for name in ("policy", "value"):
        assert _dtypes(tmp_path / name) == {"BF16"}
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    value_config = json.loads((tmp_path / "value" / "config.json").read_text())
    assert value_config["dtype"] == value_config["backbone_config"]["dtype"] == "bfloat16"
    loaded = load_policy(tmp_path / "policy", dtype="auto")  # what vLLM / HF read as "auto"
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    want = policy.module.state_dict()["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(loaded.state_dict()["model.layers.0.mlp.up_proj.weight"], want)
    assert (tmp_path / "policy" / "tokenizer.json").exists()
    # fp32 training (the CPU default) exports fp32, as before
    export_hf(policy, tmp_path / "fp32", 0, None)
    assert _dtypes(tmp_path / "fp32") == {"F32"}


def test_attention_implementation_rules():
    assert resolve_attn_implementation("auto", cuda=True, flash_attn=True) == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda=True, flash_attn=False) == "sdpa"
    assert resolve_attn_implementation("auto", cuda=False, flash_attn=False) == "sdpa"
    assert resolve_attn_implementation("eager", cuda=True, flash_attn=True) == "eager"
    with pytest.raises(EngineUnavailable, match="model.attn_implementation=flash_attention_2: "
                                                "flash_attn does not load"):
        resolve_attn_implementation("flash_attention_2", cuda=True, flash_attn=False)
    with pytest.raises(EngineUnavailable, match="this process has no CUDA device"):
        resolve_attn_implementation("flash_attention_2", cuda=False, flash_attn=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_policy_and_value_model_load_with_the_attention_asked_for(tiny_checkpoint, tmp_path,
                                                                  attn):
    from dqo_ray.models import attn_implementation, load_policy, load_value

    assert attn_implementation("auto", "cpu") == "sdpa"
    assert load_policy(tiny_checkpoint, attn=attn).config._attn_implementation == attn
    value = load_value(None, tiny_checkpoint, attn=attn)  # backbone from the policy
    assert value.backbone.config._attn_implementation == attn
    value.save_pretrained(tmp_path / "value")
    again = load_value(tmp_path / "value", tiny_checkpoint, attn=attn)
    assert again.backbone.config._attn_implementation == attn
    ids = torch.tensor([[3, 4, 5, 6]])
    assert value(ids).shape == (1, 4)
