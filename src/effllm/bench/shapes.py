"""Model shapes the benchmarks use, with random weights (no hub needed)."""

from __future__ import annotations

from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

SHAPES: dict[str, dict] = {
    "smollm-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
                         qkv_bias=True, rms_norm_eps=1e-6),
    "galore-60m": dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1376,
                       num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024),
    "galore-350m": dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2736,
                        num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=1024),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name])
