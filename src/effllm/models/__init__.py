"""The model core: config, the Llama-family transformer, checkpoint I/O and the tokenizer."""

from effllm.models.checkpoint import load_config, load_model, save_model
from effllm.models.config import ModelConfig
from effllm.models.tokenizer import Tokenizer, load_tokenizer
from effllm.models.transformer import CausalLM

__all__ = [
    "CausalLM",
    "ModelConfig",
    "Tokenizer",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model",
]
