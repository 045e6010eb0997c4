"""The `effllm` command: one subcommand per verb; each parses, calls the library and prints.

Every subcommand lives in its own module under `effllm.cli` and exposes `register(subparsers)`, which
adds its parser and sets `func` to a handler `(args) -> int`. Errors a user can cause (`EffLLMError`)
become one line on stderr and exit code 2 (`effllm.cli.errors.run_command`).
"""

from __future__ import annotations

import argparse
import importlib

from effllm import __version__
from effllm.cli.errors import run_command

COMMANDS = (
    "generate",
    "init_model",
    "serve",
    "train",
    "llm2llm",
    "tokenizer",
    "eval",
    "compress",
    "bench",
    "analyze",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effllm",
        description="EffLLM: train, compress, serve and measure Llama-family language models cheaply.",
    )
    parser.add_argument("--version", action="version", version=f"effllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"effllm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args)
