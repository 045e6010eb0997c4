"""Fixtures for the optimizer tests: a tiny Llama and its language-model loss.

The model is effllm's `CausalLM` (Hugging Face parameter names, so the optimizers' name-based groups
apply to transformers' models too). The loss reads logits from either.
"""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from effllm.models import CausalLM, ModelConfig

VOCAB = 128


def make_llama(seed: int = 0, num_layers: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-block Llama with hidden size 64 (about 100k parameters), in eval mode (no dropout)."""
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return CausalLM(config).to(dtype).eval()


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """Next-token cross-entropy; with `params`, a functional call (for forward-gradient closures)."""
    if params is None:
        out = model(input_ids)
    else:
        out = torch.func.functional_call(model, params, (input_ids,))
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


@pytest.fixture
def llama() -> Callable[..., torch.nn.Module]:
    """Factory: `llama(seed=0, num_layers=2, dtype=torch.float32)`."""
    return make_llama


@pytest.fixture
def loss_fn() -> Callable[..., torch.Tensor]:
    """`loss_fn(model, input_ids, params=None)`."""
    return lm_loss


@pytest.fixture
def batch() -> torch.Tensor:
    """A fixed batch of 4 sequences of 16 token ids."""
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
