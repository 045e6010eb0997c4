"""Tiny random transformers models of each supported family, saved to disk for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama": dict(model_type="llama"),
    "llama-llama3-rope": dict(
        model_type="llama",
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        rope_theta=500000.0,
    ),
    "llama-linear-rope": dict(model_type="llama", rope_scaling=dict(rope_type="linear", factor=2.0)),
    "llama-dynamic-rope": dict(
        model_type="llama", rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=16
    ),
    "llama-yarn-rope": dict(
        model_type="llama",
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    ),
    "llama-bias-tied": dict(model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen2-untied": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen2-sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "mistral-sliding": dict(model_type="mistral", sliding_window=6, head_dim=16),
}


def hf_config(variant: str):
    from transformers import AutoConfig

    kwargs = {**TINY, **VARIANTS[variant]}
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def build_hf_model(variant: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(variant)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    # Random (not zero) biases and norms, so that their loading is actually checked.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model


def save_hf_model(variant: str, folder: Path, seed: int = 0, **save_kwargs):
    model = build_hf_model(variant, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model
