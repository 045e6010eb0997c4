import argparse
import json

import pytest

from effllm.cli import tokenizer as tokenizer_cli
from effllm.cli import train as train_cli
from effllm.core.errors import ConfigError
from effllm.models.tokenizer import load_tokenizer
from effllm.train.metrics import read_metrics


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="effllm")
    commands = parser.add_subparsers()
    tokenizer_cli.register(commands)
    train_cli.register(commands)
    return parser.parse_args(argv)


def test_tokenizer_train_then_train_a_new_model_with_it(assets, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a fox?"},
                    {"role": "assistant", "content": "the quick brown fox"},
                ]
            }
        )
        + "\n"
    )
    args = parse(
        "tokenizer",
        "train",
        "--data",
        str(assets / "corpus.txt"),
        str(chats),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "tok"),
    )
    assert args.func(args) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.eos_token_id == 0
    text = "the lazy dog jumps over the quick brown fox"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text) / 2
    with pytest.raises(ConfigError, match="already holds a tokenizer"):
        args.func(args)

    config = json.loads((assets / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    args = parse(
        "train",
        "--model-config",
        str(tmp_path / "config.json"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--data",
        str(assets / "corpus.txt"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "3",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--no-tensorboard",
    )
    assert args.func(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert load_tokenizer(tmp_path / "run").vocab_size == 300
