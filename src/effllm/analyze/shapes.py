"""Model shapes to analyze: built-in presets, or the config.json of a folder, a file or a hub id.

Analysis needs only the architecture, so a hub id fetches config.json alone, never the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

# Hugging Face config.json fields of well-known shapes (weights never needed).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=4096,
    ),
    "llama-13b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
    "smollm-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # GaLore's pre-training shapes (configs/llama_60m.json, llama_350m.json of jiaweizzhao/GaLore).
    "galore-60m": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=1024,
    ),
    "galore-350m": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2736,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=1024,
    ),
}


def load_model_config(model: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A preset name, a config.json file, a folder holding one, or a hub id (config.json only)."""
    if isinstance(model, ModelConfig):
        return model
    text = str(model)
    if text.lower() in PRESETS:
        return ModelConfig.from_hf_dict(PRESETS[text.lower()])
    path = Path(text).expanduser()
    if path.is_file():
        return ModelConfig.from_json_file(path)
    if path.is_dir():
        return ModelConfig.from_json_file(path / "config.json")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ConfigError(
            f"model {text!r} is not a preset ({', '.join(PRESETS)}), an existing folder or config.json, "
            "nor a hub id (owner/name)"
        )
    return ModelConfig.from_json_file(_hub_config(text))


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=offline))
    except Exception as e:  # validation, network and cache-miss errors come in many types
        where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        raise ConfigError(
            f"could not get config.json of {repo_id!r} from {where} ({type(e).__name__}); "
            f"pass a preset ({', '.join(PRESETS)}) or a folder holding config.json"
        ) from None


def checkpoint_bits(config: ModelConfig) -> tuple[float, float | None]:
    """(weight bits, activation bits or None) that a compressed checkpoint's config.json states
    (compressed-tensors' quantization_config, QoQ's, or EffLLM's palettized section).

    Group scales count: 4-bit weights in groups of 32 with 16-bit scales are 4.5 bits per weight. A
    dense checkpoint gives (16, None); the layers a checkpoint leaves dense (its `ignore` list) are not
    weighed in, so the figure describes the quantized layers."""
    section = (config.effllm or {}).get("compression") or {}
    if section.get("format") == "palettized" and isinstance(section.get("bits"), int):
        return float(
            section["bits"]
        ), None  # the palettes: 2^bits values per matrix or group of rows, not counted
    qc = config.quantization_config or {}
    if qc.get("quant_method") == "effllm" and qc.get("format") == "qoq":
        # 4-bit codes, an int8 step and a uint8 zero per group, a 16-bit step per channel (not counted)
        return 4.0 + 16 / int(qc.get("group_size") or 128), 8.0
    groups = list((qc.get("config_groups") or {}).values())
    if qc.get("quant_method") != "compressed-tensors" or not groups:
        return 16.0, None
    weights = groups[0].get("weights") or {}
    bits = float(weights.get("num_bits", 16))
    if weights.get("strategy") == "group" and weights.get("group_size"):
        bits += 16 / weights["group_size"] * (1 if weights.get("symmetric", True) else 1.25)
    inputs = groups[0].get("input_activations") or {}
    return bits, (float(inputs["num_bits"]) if inputs.get("num_bits") else None)
