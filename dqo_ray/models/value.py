"""Value model V_phi(s_h): a causal-LM backbone plus a scalar head (docs/algorithm.md section 2).

V(s_h) is read from the hidden state at the position just before a_h, i.e. the same position
whose logits score a_h. So for input ids x[0..L-1], `forward(...)[:, t]` is V of the state
"tokens 0..t" and aligns with the log-prob of token t+1, exactly like shifted logits.
Saved and loaded in HF format (config.json with model_type "dqo_value" + safetensors), so
`ValueModel.from_pretrained(dir)` and `AutoModel.from_pretrained(dir)` both work.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class ValueModelConfig(PreTrainedConfig):
    model_type = "dqo_value"
    sub_configs = {"backbone_config": AutoConfig}

    backbone_config: dict | PreTrainedConfig | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.backbone_config, dict):
            self.backbone_config = CONFIG_MAPPING[self.backbone_config["model_type"]](
                **self.backbone_config)
        super().__post_init__(**kwargs)


class ValueModel(PreTrainedModel):
    config_class = ValueModelConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    # The attention is the backbone's: choosing sdpa / flash_attention_2 here passes the choice
    # on to it (and the backbone's own class says whether it can run it).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: ValueModelConfig) -> None:
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("ValueModelConfig.backbone_config is required")
        self.backbone = AutoModel.from_config(config.backbone_config)
        self.value_head = nn.Linear(config.backbone_config.hidden_size, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # V starts at 0 everywhere: before training the soft value of every state is unknown,
        # and a zero head leaves the backbone's features unperturbed.
        if module is self.value_head:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] -> values [B, L] float32 (value of the state ending at each position)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # [B, L, D]
        return self.value_head(hidden).squeeze(-1).float()

    @classmethod
    def from_policy(cls, policy_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    attn: str | None = None) -> ValueModel:
        """Backbone initialised from a causal-LM checkpoint (its LM head dropped), zero head.
        `attn`: attention implementation, None = transformers' default."""
        kwargs = {"attn_implementation": attn} if attn else {}
        backbone = AutoModel.from_pretrained(policy_path, dtype=dtype, **kwargs)
        model = cls(ValueModelConfig(backbone_config=backbone.config))
        if attn:  # from_config does not keep the backbone config's choice: set it again
            model.set_attn_implementation(attn)
        model.backbone.load_state_dict(backbone.state_dict())
        return model.to(dtype)


AutoConfig.register(ValueModelConfig.model_type, ValueModelConfig, exist_ok=True)
AutoModel.register(ValueModelConfig, ValueModel, exist_ok=True)
