"""Tiny models for engine tests: transformers' reference and effllm's copy of the same weights."""

import pytest
import torch

from effllm.models import CausalLM, ModelConfig, load_model
from tests.models.hf_fixtures import build_hf_model

# A context long enough for 300-token prompts plus their continuations (default RoPE ignores it).
MAX_POSITIONS = 512


def hf_and_effllm(variant: str, folder, seed: int = 0):
    hf = build_hf_model(variant, seed)
    hf.config.max_position_embeddings = MAX_POSITIONS
    hf.save_pretrained(folder)
    return hf, load_model(folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """effllm's tiny llama (vocab 128, 2 layers, GQA 4/2), with no EOS so generations run to max_tokens."""
    _, model = hf_and_effllm("llama", tmp_path_factory.mktemp("llama"))
    model.config.eos_token_id = None
    return model


def byte_model(seed: int = 0) -> CausalLM:
    """A tiny llama over a byte-level vocabulary (259 ids) whose greedy output is printable ASCII."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = CausalLM(config).eval()
    with torch.no_grad():
        printable = torch.zeros(259, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0
        model.lm_head.weight[printable] *= 20
    return model
