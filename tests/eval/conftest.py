"""Tiny random checkpoints for the eval tests: a byte-level tokenizer without BOS, and a BPE one that adds BOS.

The weights are drawn wider than a real initialisation (std 0.5), so that choices get clearly different
log-likelihoods and accuracy comparisons do not hinge on near-ties.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import processors

from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.models.tokenizer import Tokenizer, load_tokenizer
from effllm.models.tokenizer_training import build_byte_level_tokenizer, train_bpe_tokenizer

BPE_TRAINING_TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
    "amusement, never took up any book but the Baronetage. Question: how do you grow tomatoes? Answer: "
    "pick a sunny spot and water the plants daily.",
] * 50


def save_random_model(
    folder: Path, tokenizer: Tokenizer, seed: int = 0, max_position_embeddings: int = 256
) -> Path:
    config = ModelConfig(
        model_type="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return save_model(CausalLM(config), folder, tokenizer=tokenizer)


def bpe_tokenizer_with_bos() -> Tokenizer:
    """A byte-level BPE whose encode() prepends <s>, as a Llama tokenizer does."""
    trained = train_bpe_tokenizer(BPE_TRAINING_TEXT, vocab_size=400, special_tokens=("<s>", "<|endoftext|>"))
    backend = trained.backend
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return Tokenizer(backend, {**trained.config, "bos_token": "<s>"})


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("eval") / "byte", build_byte_level_tokenizer())


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("eval") / "bpe", bpe_tokenizer_with_bos(), seed=1)


@pytest.fixture(scope="session", params=["byte", "bpe"])
def model_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_model_dir")


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    return load_model(model_dir, dtype="float32", device="cpu"), load_tokenizer(model_dir)
