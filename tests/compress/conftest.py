import pytest
import torch

from effllm.models import CausalLM, ModelConfig


def quant_model(seed: int = 0, tie: bool = True, vocab_size: int = 96) -> CausalLM:
    """A tiny llama whose every linear fits 4-bit packing (K % 32 == 0, N % 16 == 0), GQA 4/2."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=None,
    )
    return CausalLM(config).eval()


@pytest.fixture
def model():
    return quant_model()


@pytest.fixture
def calibration():
    return torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(3))
