"""`effllm serve`: an OpenAI-compatible HTTP server over the engine (`python -m effllm.cli.serve` also runs it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from effllm.cli.errors import run_command
from effllm.core.errors import InputError
from effllm.engine.config import add_engine_flags, engine_options

DESCRIPTION = """Serve a model over OpenAI's API: POST /v1/completions and /v1/chat/completions (streaming
with "stream": true), GET /v1/models, POST /tokenize and /detokenize, GET /health, /version and /metrics
(Prometheus). Any OpenAI client works: base_url=http://HOST:PORT/v1. SIGTERM or Ctrl-C shuts down
gracefully (in-flight requests finish, up to --shutdown-timeout) and exits 0."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=DESCRIPTION
    )
    add_args(p)
    p.set_defaults(func=run)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the embedded default model)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("EFFLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $EFFLLM_API_KEY, else none)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients pass as 'model' (default: the --model argument)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="answer 429 while this many requests wait for the engine (default: no limit)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="abort a request running longer than this many seconds (default: no limit)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body accepted, in bytes (default 4 MiB; larger gets 413)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on shutdown before they are aborted (default 30)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_flags(p.add_argument_group("engine options (EngineConfig fields)"))


def run(args: argparse.Namespace) -> int:
    _check(args)
    from effllm.engine.llm_engine import LLMEngine
    from effllm.models.default import model_or_default
    from effllm.serve.app import build_app
    from effllm.serve.server import run_server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    model = model_or_default(args.model)
    engine = LLMEngine.from_pretrained(model, **engine_options(args))
    app = build_app(
        engine,
        served_model_names=args.served_model_name or [args.model or "effllm-default"],
        api_key=args.api_key,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        model_root=model,
    )
    run_server(
        app,
        args.host,
        args.port,
        shutdown_timeout=args.shutdown_timeout,
        on_shutdown_timeout=app.state.engine.abort_all,
        log_level=args.log_level,
    )
    return 0


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_queue", "request_timeout", "shutdown_timeout"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.max_body_bytes < 1024:
        raise InputError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty; give a key or leave the flag out")


def build_parser() -> argparse.ArgumentParser:
    """The `effllm serve` parser on its own (python -m effllm.cli.serve)."""
    parser = argparse.ArgumentParser(prog="effllm serve", description=DESCRIPTION)
    add_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`effllm serve` on its own (python -m effllm.cli.serve ...)."""
    args = build_parser().parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
