# The two commands a newcomer needs: `make demo` and `make test`. Both create the
# environment first when it is missing (or older than pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Keep every cache inside the project (compiled DeepSpeed ops, vLLM/inductor caches).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1

.PHONY: env demo demo-compare learning test test-slow lint clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

env: $(STAMP)

# The whole pipeline on this machine (local Ray, vLLM, DeepSpeed, evaluator): see README.
# Re-running continues (or re-prints) runs/demo; DEMO_ARGS="--set run.name=demo2" starts anew.
demo: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/demo.yaml $(DEMO_ARGS)

demo-compare: $(STAMP)
	$(PY) -m jobs.compare --config configs/demo-compare.yaml $(DEMO_ARGS)

# Does DQO teach the model? DQO vs RFT vs the gold control, 3 seeds, paired intervals
# (benchmarks/learning.py; hours on 2 cores, resumable). LEARNING_ARGS="--seeds 0" for one.
learning: $(STAMP)
	$(PY) benchmarks/learning.py $(LEARNING_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -m "not slow" --durations=40 tests

test-slow: $(STAMP)
	$(PY) -m pytest -m slow tests

clean:
	rm -rf runs .cache .pytest_cache .ruff_cache
