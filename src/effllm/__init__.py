"""EffLLM: efficient LLMs, measured against the hardware's limit."""

from effllm.core.errors import EffLLMError
from effllm.engine import LLM, LLMEngine, RequestOutput, SamplingParams
from effllm.models.checkpoint import load_config, load_model, save_model
from effllm.models.config import ModelConfig
from effllm.models.tokenizer import Tokenizer, load_tokenizer
from effllm.models.transformer import CausalLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CausalLM",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "EffLLMError",
    "ModelConfig",
    "Tokenizer",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model",
]
