"""Model shapes the benchmarks build with random weights: analyze's presets plus a tiny one for smoke runs."""

from __future__ import annotations

from effllm.analyze.shapes import PRESETS
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

SHAPES: dict[str, dict] = {
    **PRESETS,
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig.from_hf_dict(SHAPES[name])
