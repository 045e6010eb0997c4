"""The inference engine: paged KV cache, continuous batching with chunked prefill, prefix caching."""

from effllm.engine.config import EngineConfig
from effllm.engine.llm import LLM
from effllm.engine.llm_engine import EngineStats, LLMEngine
from effllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from effllm.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
