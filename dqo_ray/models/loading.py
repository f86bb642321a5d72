"""Loading policy, value model and tokenizer from the model section of the config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dqo_ray.device import resolve_attn_implementation, resolve_dtype_name
from dqo_ray.models.value import ValueModel

log = logging.getLogger(__name__)


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """model.dtype on `device` as a torch dtype; the rule (`auto` = bfloat16 on CUDA, float32
    elsewhere) is `dqo_ray.device.resolve_dtype_name`."""
    cuda = torch.device(device).type == "cuda"
    return getattr(torch, resolve_dtype_name(name, cuda))


def attn_implementation(name: str, device: torch.device | str = "cpu") -> str:
    """model.attn_implementation on `device` (the rule: dqo_ray.device)."""
    from transformers.utils import is_flash_attn_2_available

    cuda = torch.device(device).type == "cuda"
    return resolve_attn_implementation(name, cuda, cuda and is_flash_attn_2_available())


def _attn(attn: str | None) -> dict[str, str]:
    return {"attn_implementation": attn} if attn else {}  # None: transformers' default


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                attn: str | None = None) -> PreTrainedModel:
    """Any HF causal LM checkpoint folder (or hub name outside tests). `attn`: the attention
    implementation (`attn_implementation`), None = transformers' default."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **_attn(attn))


def load_value(value_path: str | os.PathLike | None, policy_path: str | os.PathLike,
               dtype: torch.dtype = torch.float32, attn: str | None = None) -> ValueModel:
    """A saved value model, or (value_path None) one initialised from the policy checkpoint."""
    if value_path is None:
        log.info("value model: backbone from policy %s, zero head", policy_path)
        return ValueModel.from_policy(policy_path, dtype=dtype, attn=attn)
    return ValueModel.from_pretrained(value_path, dtype=dtype, **_attn(attn))


def load_tokenizer(path: str | os.PathLike):
    """The folder's (or hub name's) tokenizer, with a pad token. Raises ConfigError naming
    the folder when it holds no loadable tokenizer (missing or damaged files)."""
    from dqo_ray.config import ConfigError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError([f"{path}: cannot load its tokenizer ({first})"]) from exc
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out everywhere here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_checkpoint(name: str, run_dir: str | os.PathLike, key: str) -> str:
    """A checkpoint folder named in the config, made absolute (Ray Train workers run in their
    own folder, so a path relative to the driver's would not load there); "tiny" means the run
    folder's base checkpoint (written by the demo / pipeline jobs). Raises ConfigError naming
    `key` when the folder is not an HF checkpoint."""
    from dqo_ray.config import ConfigError

    path = Path(run_dir) / "base" if name == "tiny" else Path(name)
    if not (path / "config.json").exists():
        hint = (" (model.policy=tiny uses run_dir/base, written by the demo or pipeline job)"
                if name == "tiny" else "")
        raise ConfigError([f"{key}: {name!r} -> {path} is not an HF checkpoint folder{hint}"])
    return str(path.absolute())
