"""The OpenAI-compatible server: `build_app(engine)` over an `AsyncEngine`, run by `run_server` (`effllm serve`)."""

from effllm.serve.app import build_app
from effllm.serve.async_engine import AsyncEngine, RequestStream
from effllm.serve.server import make_server, run_server

__all__ = ["AsyncEngine", "RequestStream", "build_app", "make_server", "run_server"]
