"""The `effllm` command: one subcommand per verb; each parses, calls the library and prints.

Every subcommand lives in its own module under `effllm.cli` and exposes `register(subparsers)`, which
adds its parser and sets `func` to a handler `(args) -> int`. Errors a user can cause (`EffLLMError`)
become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from effllm import __version__
from effllm.core.errors import EffLLMError

COMMANDS = ("generate", "init_model", "serve", "train", "tokenizer", "eval", "bench", "analyze")


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
    try:
        return int(args.func(args) or 0)
    except EffLLMError as e:
        print(f"effllm: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"effllm: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
