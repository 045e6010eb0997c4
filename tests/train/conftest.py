"""Tiny assets for the training tests: a byte-level tokenizer, a 2-layer llama config and a corpus."""

import json
from pathlib import Path

import pytest

from effllm.models.tokenizer_training import build_byte_level_tokenizer
from effllm.train import TrainConfig

TINY_MODEL = dict(
    model_type="llama",
    vocab_size=272,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CORPUS = "".join(f"line {i % 7}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-assets")
    build_byte_level_tokenizer(root / "tok")
    (root / "config.json").write_text(json.dumps(TINY_MODEL))
    (root / "corpus.txt").write_text(CORPUS)
    return root


@pytest.fixture
def make_config(assets, tmp_path):
    """A TrainConfig for the tiny model on the corpus, writing to tmp_path/NAME; options override."""

    def make(name: str = "run", **options) -> TrainConfig:
        values = dict(
            model_config=str(assets / "config.json"),
            tokenizer=str(assets / "tok"),
            data=[str(assets / "corpus.txt")],
            out=str(tmp_path / name),
            steps=6,
            seq_len=32,
            batch_size=4,
            lr=3e-3,
            eval_fraction=0.1,
            tensorboard=False,
            log_every=1000,
        )
        values.update(options)
        return TrainConfig(**values)

    return make
