"""`effllm tokenizer train`: a byte-level BPE tokenizer for a model trained from scratch.

It reads the same data `effllm train` reads (text files, folders, jsonl with a text field, chat jsonl)
and writes tokenizer.json, tokenizer_config.json and a ChatML chat_template.jinja to OUT, the folder to
pass as `effllm train --tokenizer OUT`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effllm.core.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="make tokenizers (train a byte-level BPE)", description=__doc__
    )
    commands = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = commands.add_parser("train", help="train a byte-level BPE on text or jsonl data", description=__doc__)
    t.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help="text files, folders or jsonl files"
    )
    t.add_argument("--out", required=True, help="folder to write the tokenizer to")
    t.add_argument("--vocab-size", type=int, default=8000, help="tokens in the vocabulary (default 8000)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    t.add_argument(
        "--special-tokens",
        nargs="+",
        default=None,
        metavar="TOKEN",
        help="special tokens, given the first ids (default <|endoftext|> <|im_start|> <|im_end|>)",
    )
    t.add_argument(
        "--eos-token", default=None, help="the end-of-text token (default: the first special token)"
    )
    t.add_argument("--text-field", default="text", help="the field of a jsonl record that holds its text")
    t.set_defaults(func=run_train)


def train_tokenizer(
    data: list[str],
    out: str | Path,
    vocab_size: int = 8000,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    eos_token: str | None = None,
    text_field: str = "text",
):
    """Train and save a byte-level BPE on `data`; returns the `Tokenizer`."""
    from effllm.models.tokenizer_training import DEFAULT_SPECIAL_TOKENS, train_bpe_tokenizer
    from effllm.train.sources import find_files, iter_texts

    out = Path(out)
    if (out / "tokenizer.json").exists():
        raise ConfigError(f"{out} already holds a tokenizer; choose another --out")
    specials = list(special_tokens or DEFAULT_SPECIAL_TOKENS)
    eos = eos_token or specials[0]
    if eos not in specials:
        raise ConfigError(f"--eos-token {eos!r} must be one of the --special-tokens")
    files = find_files(data)
    return train_bpe_tokenizer(
        iter_texts(files, text_field),
        vocab_size,
        specials,
        min_frequency=min_frequency,
        eos_token=eos,
        pad_token=eos,
        folder=out,
    )


def run_train(args: argparse.Namespace) -> int:
    tokenizer = train_tokenizer(
        args.data,
        args.out,
        args.vocab_size,
        args.min_frequency,
        args.special_tokens,
        args.eos_token,
        args.text_field,
    )
    print(f"wrote a byte-level BPE tokenizer with {tokenizer.vocab_size} tokens to {args.out}")
    return 0
