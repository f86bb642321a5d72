"""Generation engines: one small interface (`GenerationEngine`), vLLM and HF implementations."""

from actors.engines.base import (
    ENGINE_KINDS,
    EngineUnavailable,
    GenerationEngine,
    Sample,
    SamplingSpec,
    local_checkpoint,
    make_engine,
    materialise,
    vllm_importable,
)

__all__ = ["ENGINE_KINDS", "EngineUnavailable", "GenerationEngine", "Sample", "SamplingSpec", "local_checkpoint",
           "make_engine", "materialise", "vllm_importable"]
