"""Generation engines: one small interface (`GenerationEngine`), vLLM and HF implementations."""

from actors.engines.base import (
    GenerationEngine,
    Sample,
    SamplingSpec,
    local_checkpoint,
    materialise,
)
from actors.engines.factory import ENGINE_KINDS, make_engine, vllm_importable
from dqo_ray.device import EngineUnavailable

__all__ = ["ENGINE_KINDS", "EngineUnavailable", "GenerationEngine", "Sample", "SamplingSpec", "local_checkpoint",
           "make_engine", "materialise", "vllm_importable"]
