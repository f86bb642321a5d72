#!/usr/bin/env bash
# The GPU path on one lent GPU, in under 8 minutes: device rules, all-reduce on CUDA, the DQO
# train step in bf16 through our engine classes (tokens/s, peak memory, MFU), the bf16 HF
# export, and HF sampling log-probs against a forward pass. Writes a markdown table.
#
#   scripts/gpu_check.sh RESULTS.md [--wheels DIR] [gpu_check.py options: --size 0.25b ...]
#
# Needs python with torch (CUDA) and transformers; no Ray, vLLM or internet. DeepSpeed is used
# where it imports; --wheels DIR first installs wheels found there (e.g. a DeepSpeed wheel
# built elsewhere: `pip wheel deepspeed==0.19.8 --no-deps -w DIR`) without the network.
# Without CUDA it prints "no CUDA: nothing to check" and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: scripts/gpu_check.sh RESULTS.md [--wheels DIR] [options]" >&2
    exit 2
fi
out="$1"
shift
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--wheels" ]]; then
    wheels="${2:?--wheels needs a folder}"
    shift 2
    shopt -s nullglob
    found=("$wheels"/*.whl)
    if (( ${#found[@]} )); then
        "$PY" -m pip install --no-index --no-deps --quiet "${found[@]}" \
            || echo "[gpu_check] could not install the wheels in $wheels: going on without them" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Project-local caches, so a lent machine's home folder stays as it was.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
# 8 minutes at most, whatever happens (the table is written at the end).
exec timeout --kill-after=10 470 "$PY" scripts/gpu_check.py "$out" "$@"
