"""The OpenAI-compatible HTTP app: `build_app(engine, ...)` returns a FastAPI app over an `LLMEngine`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/embeddings`,
`GET /v1/models[/{id}]`, `POST /tokenize`, `POST /detokenize` (these need the API key when one is set), and `GET /health`, `/version`, `/metrics`
(these never do). Every error is OpenAI's JSON shape; bodies are parsed by hand so that malformed JSON,
a wrong type or an oversized body is a 400/413 that names the problem, never a crash.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from effllm import __version__
from effllm.core.errors import ConfigError, EffLLMError
from effllm.core.text import invalid_text_path
from effllm.serve.async_engine import AsyncEngine
from effllm.serve.completions import CLIENT_CLOSED, Served, create_chat_completion, create_completion
from effllm.serve.embeddings import create_embeddings
from effllm.serve.errors import (
    APIError,
    AuthenticationError,
    ModelNotFoundError,
    PayloadTooLargeError,
    error_response,
    from_exception,
    from_validation_error,
)
from effllm.serve.metrics import CONTENT_TYPE, ServerMetrics
from effllm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

logger = logging.getLogger("effllm.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) this much of an oversized body, so the client sees the 413

Body = TypeVar("Body", bound=BaseModel)


def build_app(
    engine: Any,
    *,
    served_model_names: list[str] | str | None = None,
    api_key: str | None = None,
    max_queue: int | None = None,
    request_timeout: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_root: str | None = None,
) -> FastAPI:
    """A FastAPI app serving `engine` (an `LLMEngine` with a tokenizer) under OpenAI's API.

    served_model_names: the names clients pass as `model` (the first is the one listed); api_key: the
    Bearer token /v1 routes require; max_queue: requests waiting for the engine beyond which new ones
    get 429; request_timeout: seconds after which a request is aborted (408).
    """
    if engine.tokenizer is None:
        raise ConfigError("the server needs a model with a tokenizer (tokenizer.json in its folder)")
    names = [served_model_names] if isinstance(served_model_names, str) else list(served_model_names or [])
    names = names or [model_root or "effllm"]
    async_engine = AsyncEngine(engine, max_queue=max_queue, request_timeout=request_timeout)
    metrics = ServerMetrics(
        names[0],
        running=lambda: async_engine.num_requests()[0],
        waiting=lambda: async_engine.num_requests()[1],
        kv_usage=async_engine.kv_cache_usage,
        spec_decode={
            "effllm:spec_decode_num_draft_tokens": lambda: engine.stats.num_draft_tokens,
            "effllm:spec_decode_num_accepted_tokens": lambda: engine.stats.num_accepted_tokens,
            "effllm:spec_decode_num_verifications": lambda: engine.stats.num_verifications,
        },
    )
    async_engine.metrics = metrics
    served = Served(
        async_engine,
        engine.tokenizer,
        names[0],
        engine.config.max_model_len,
        engine.model.config.vocab_size,
        frozenset(engine.adapters),
    )
    names += [name for name in engine.adapters if name not in names]  # an adapter is asked for by name

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.shutdown()

    app = FastAPI(
        title="EffLLM",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.served, app.state.engine, app.state.metrics = served, async_engine, metrics
    _add_error_handlers(app)
    app.include_router(_public_routes(async_engine, metrics))
    app.include_router(_api_routes(served, names, model_root), dependencies=[Depends(_key_checker(api_key))])
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestLog)
    return app


# ---------------------------------------------------------------- routes


def _public_routes(async_engine: AsyncEngine, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not async_engine.healthy:
            return error_response(503, "the engine is not running", code="unavailable")
        return JSONResponse({})

    @router.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router


def _api_routes(served: Served, names: list[str], model_root: str | None) -> APIRouter:
    router = APIRouter()

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=model_root or name, max_model_len=served.max_model_len)

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            raise ModelNotFoundError(
                f"the model '{name}' does not exist; this server serves {names}", param="model"
            )

    @router.get("/v1/models")
    async def list_models() -> dict:
        return ModelList(data=[card(name) for name in names]).model_dump()

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        check_model(model_id)
        return card(model_id).model_dump()

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        check_model(body.model)
        return await create_completion(served, body, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        check_model(body.model)
        return await create_chat_completion(served, body, request)

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await parse_body(request, EmbeddingRequest)
        check_model(body.model)
        if body.model in served.adapters:
            raise APIError(
                f"'{body.model}' is a LoRA adapter; embeddings are the base model's: ask for '{names[0]}'",
                param="model",
            )
        return await create_embeddings(served, body)

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await parse_body(request, TokenizeRequest)
        check_model(body.model)
        tokenizer = served.tokenizer
        if body.messages is not None:
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
            )
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await parse_body(request, DetokenizeRequest)
        check_model(body.model)
        bad = next((t for t in body.tokens if t >= served.vocab_size), None)
        if bad is not None:
            raise APIError(
                f"token id {bad} is outside the vocabulary [0, {served.vocab_size})", param="tokens"
            )
        return {"prompt": served.tokenizer.decode(body.tokens)}

    return router


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The request body as `model`: 400 for invalid JSON or fields, 413 (from BodyLimit) when too large."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError and bad UTF-8
        raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json"
        )
    bad = invalid_text_path(data)  # a lone surrogate anywhere is a 400 here, never a tokenizer crash later
    if bad is not None:
        raise APIError(
            f"{bad or 'a key'} is not valid Unicode (it holds a lone surrogate); send UTF-8 text",
            param=bad or None,
            code="invalid_unicode",
        )
    return model.model_validate(data)


def _key_checker(api_key: str | None):
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").strip().encode()
        if not hmac.compare_digest(given, expected):
            raise AuthenticationError(
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'"
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, EffLLMError | ValidationError):
            logger.exception("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
        return from_exception(exc)

    async def on_request_validation(request: Request, exc: RequestValidationError) -> Response:
        return from_validation_error(ValidationError.from_exception_data("request", exc.errors()))

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        )

    app.add_exception_handler(EffLLMError, on_error)
    app.add_exception_handler(ValidationError, on_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)

    async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody to answer: the client hung up mid-body

    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_error)


# ---------------------------------------------------------------- middleware


class BodyLimit:
    """413 for a body over `max_bytes`, declared (Content-Length) or counted as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            return await error_response(413, self._message(), code=PayloadTooLargeError.code)(
                scope, receive, send
            )
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body"):
                        await self._drain(receive)
                    raise PayloadTooLargeError(self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"

    @staticmethod
    async def _drain(receive: Receive) -> None:
        drained = 0
        while drained < _DRAIN_LIMIT:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return


class RequestLog:
    """One log line per request once its response has ended: method, path, status, tokens, latency."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        completed = gone = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        async def receive_and_note() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, receive_and_note, send_and_note)
        finally:
            if gone and not completed:
                status = CLIENT_CLOSED  # the client left before the response ended (nginx's 499)
            usage = scope.get("effllm.usage")
            tokens = (
                ""
                if usage is None
                else (f" prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}")
            )
            client = scope.get("client") or ("-", 0)
            logger.info(
                "%s %s %s %d%s %.3fs",
                client[0],
                scope["method"],
                scope["path"],
                status,
                tokens,
                time.perf_counter() - start,
            )
