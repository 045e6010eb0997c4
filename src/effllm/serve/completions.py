"""`/v1/completions` and `/v1/chat/completions`: validated requests in, OpenAI responses out.

A request becomes token-id prompts and one `SamplingParams`; the async engine runs them (n samples per
prompt); the outputs become one response or a stream of server-sent events ending in `data: [DONE]`.
Choice i*n + j is sample j of prompt i. Streamed deltas come from the engine's `delta_text`, which
holds back a possible stop-string prefix, so the deltas always add up to the non-streamed text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from effllm.core.errors import EffLLMError
from effllm.engine.outputs import CompletionOutput, RequestOutput
from effllm.engine.sampling_params import SamplingParams
from effllm.models.byte_level import bytes_to_unicode
from effllm.models.tokenizer import Tokenizer
from effllm.serve.async_engine import AsyncEngine, RequestStream
from effllm.serve.errors import APIError, error_body
from effllm.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    SamplingFields,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from effllm.serve.tools import (
    AutoToolStream,
    new_call_id,
    parse_auto,
    parse_required,
    template_tools,
    tool_constraint,
    tools_system_message,
)

CLIENT_CLOSED = 499  # nginx's status for a client that went away; only the request log sees it
_RESERVED_TEMPLATE_KEYS = {
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "tools",
    "documents",
    "chat_template",
}


class ContextLengthError(APIError):
    code = "context_length_exceeded"


@dataclass
class Served:
    """What the handlers share: the engine, its tokenizer and limits, the public model name."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    adapters: frozenset[str] = frozenset()  # LoRA adapters a request names as its `model`

    def name_for(self, requested: str | None) -> str:
        """The `model` a response names: the adapter the request asked for, or the served model's name."""
        return requested if requested in self.adapters else self.model_name

    @functools.cached_property
    def tokens(self) -> TokenText:
        return TokenText(self.tokenizer)


# ---------------------------------------------------------------- requests to engine inputs


def sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured: dict | None = None,
    adapters: frozenset[str] = frozenset(),
) -> SamplingParams:
    """The engine's parameters for a request (OpenAI's defaults where it leaves a field out)."""
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        structured=structured,
        adapter=req.model if req.model in adapters else None,
    )


async def compile_constraint(served: Served, params: SamplingParams) -> None:
    """Compile the request's constraint on a worker thread, so the engine loop finds it cached (a spec
    that cannot compile is a 400 here)."""
    if params.structured is not None:
        await asyncio.to_thread(served.engine.engine.structured.compile, params.structured)


def check_prompt(served: Served, ids: list[int], max_tokens: int | None, param: str) -> None:
    """400 for token ids outside the vocabulary or a prompt (plus max_tokens) over the context."""
    bad = next((t for t in ids if t >= served.vocab_size), None)
    if bad is not None:
        raise APIError(f"token id {bad} is outside the vocabulary [0, {served.vocab_size})", param=param)
    limit = served.max_model_len
    if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
        asked = f"{len(ids)} in the prompt" + (f", {max_tokens} in the completion" if max_tokens else "")
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens, but you requested "
            f"{len(ids) + (max_tokens or 0)} tokens ({asked}); shorten the prompt or lower max_tokens",
            param=param,
        )


def completion_prompts(served: Served, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt of a completion request."""
    ids, texts = [], []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            ids.append(served.tokenizer.encode(prompt))
            texts.append(prompt)
        else:
            ids.append(list(prompt))
            texts.append(served.tokenizer.decode(prompt) if req.echo else "")
        check_prompt(served, ids[-1], req.max_tokens, "prompt")
    return ids, texts


def chat_prompt(served: Served, req: ChatCompletionRequest) -> list[int]:
    """The chat rendered through the model's chat template, as token ids."""
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = _RESERVED_TEMPLATE_KEYS & kwargs.keys()
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {sorted(reserved)}", param="chat_template_kwargs")
    messages, tools = req.chat_messages(), template_tools(req)
    if tools and "tools" not in json.dumps(served.tokenizer.chat_template):
        messages = _with_system(messages, tools_system_message(tools)["content"])
        tools = None
    text = served.tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        tools=tools,
        **kwargs,
    )
    ids = served.tokenizer.encode(text, add_special_tokens=False)
    check_prompt(served, ids, req.max_new_tokens(), "messages")
    return ids


def _with_system(messages: list[dict], text: str) -> list[dict]:
    """`text` added to the first system message, or as a new one before the others."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ---------------------------------------------------------------- logprobs


class TokenText:
    """Each token's text and exact bytes (byte-level BPE tokens may hold part of a character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = type(tokenizer.backend.decoder).__name__ == "ByteLevel"
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server, the cache is its point
    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id) if self.byte_level else None
        if (
            piece is not None
            and token_id not in self.tokenizer.special_token_ids
            and all(c in self.byte_of for c in piece)
        ):
            return [self.byte_of[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(
    tokens: TokenText, ids: list[int], entries: list[dict[int, float]], k: int, offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: parallel lists, top_logprobs as {token text: logprob} (k and the sampled)."""
    out = CompletionLogprobs()
    for token, entry in zip(ids, entries, strict=True):
        text = tokens.text(token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:  # the prompt's first token: nothing before it to predict it from
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.get(token))
        top = {tokens.text(t): lp for t, lp in _top(entry, k)}
        top.setdefault(text, entry.get(token))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(tokens: TokenText, ids: list[int], entries: list[dict[int, float]], k: int) -> ChatLogprobs:
    content = []
    for token, entry in zip(ids, entries, strict=True):
        top = [
            TopLogprob(token=tokens.text(t), logprob=lp, bytes=tokens.bytes(t)) for t, lp in _top(entry, k)
        ]
        content.append(
            TokenLogprob(
                token=tokens.text(token),
                logprob=entry.get(token, float("-inf")),
                bytes=tokens.bytes(token),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def _new_logprobs(c: CompletionOutput) -> list[dict[int, float]]:
    """Log-probabilities of the tokens this step added."""
    return (c.logprobs or [])[len(c.token_ids) - len(c.delta_token_ids) :]


# ---------------------------------------------------------------- running a request


async def collect(stream: RequestStream, request: Request) -> list[RequestOutput] | None:
    """Each prompt's final output, or None when the client disconnected first (the stream is aborted)."""
    finals: dict[int, RequestOutput] = {}

    async def run() -> None:
        async for i, out in stream:
            if out.finished:
                finals[i] = out

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
    if not work.done() or work.cancelled():
        stream.abort()
        return None
    work.result()  # re-raise an engine or timeout error
    return [finals[i] for i in sorted(finals)]


class SSEResponse(StreamingResponse):
    """Server-sent events from `body`; the request is aborted however the response ends."""

    def __init__(self, body: AsyncIterator[str], stream: RequestStream):
        # no-cache and X-Accel-Buffering keep proxies (nginx) from holding events back
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.abort()


def _event(data: BaseModel | dict) -> str:
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {body}\n\n"


async def _events(
    stream: RequestStream,
    chunks: AsyncIterator[BaseModel],
    usage: _UsageCount,
    include_usage: bool,
    make_usage_chunk,
) -> AsyncIterator[str]:
    """Chunks as SSE lines, then the usage chunk if asked, then [DONE]; an error mid-stream is an event."""
    async with stream:
        try:
            async for chunk in chunks:
                yield _event(chunk)
            if include_usage:
                yield _event(make_usage_chunk(usage.usage()))
        except EffLLMError as e:
            yield _event(
                error_body(
                    getattr(e, "http_status", 400),
                    str(e),
                    getattr(e, "param", None),
                    getattr(e, "code", None),
                )
            )
    yield "data: [DONE]\n\n"


@dataclass
class _UsageCount:
    """Tokens of a request's prompts and completions so far (so a stream cut short still logs what it used)."""

    counts: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # engine request id -> (prompt, completion)
    drafts: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> (drafted, accepted)

    @property
    def prompt_tokens(self) -> int:
        return sum(p for p, _ in self.counts.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c for _, c in self.counts.values())

    def usage(self) -> Usage:
        drafted = sum(d for d, _ in self.drafts.values())
        accepted = sum(a for _, a in self.drafts.values())
        return Usage.of(self.prompt_tokens, self.completion_tokens, drafted, accepted)

    def observe(self, out: RequestOutput) -> None:
        self.counts[out.request_id] = (len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))
        self.drafts[out.request_id] = (out.num_draft_tokens, out.num_accepted_tokens)


def record_usage(request: Request, usage: _UsageCount) -> None:
    """Hand the token counts to the request log (it reads them when the response ends)."""
    request.scope["effllm.usage"] = usage


# ---------------------------------------------------------------- /v1/completions


async def create_completion(served: Served, req: CompletionRequest, request: Request) -> Response:
    if req.max_tokens == 0 and not req.echo:
        raise APIError(
            "max_tokens must be at least 1 (0 only with echo, which returns the scored prompt)",
            param="max_tokens",
        )
    prompts, texts = completion_prompts(served, req)
    # echo with logprobs scores the prompt too (lm-evaluation-harness's log-likelihoods); max_tokens 0 needs it.
    scores_prompt = req.echo and (req.logprobs is not None or req.max_tokens == 0)
    prompt_logprobs = (req.logprobs or 0) if scores_prompt else None
    params = sampling_params(
        req, req.max_tokens, req.logprobs, prompt_logprobs, req.structured(), served.adapters
    )
    await compile_constraint(served, params)
    stream = served.engine.submit(prompts, params)
    rid, created, usage = f"cmpl-{uuid.uuid4().hex}", int(time.time()), _UsageCount()
    record_usage(request, usage)
    echo = texts if req.echo else [""] * len(prompts)
    if req.stream:
        chunks = _completion_chunks(served, req, stream, rid, created, echo, usage)
        include = bool(req.stream_options and req.stream_options.include_usage)
        usage_chunk = functools.partial(
            CompletionResponse, id=rid, created=created, model=served.name_for(req.model), choices=[]
        )
        return SSEResponse(_events(stream, chunks, usage, include, lambda u: usage_chunk(usage=u)), stream)
    async with stream:
        finals = await collect(stream, request)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for i, out in enumerate(finals):
        usage.observe(out)
        for c in out.outputs:
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(
                    served.tokens, c.token_ids, c.logprobs or [], req.logprobs, len(echo[i])
                )
                if req.echo:  # the prompt's tokens first, each scored given those before it
                    scored = completion_logprobs(
                        served.tokens, out.prompt_token_ids, out.prompt_logprobs, req.logprobs, 0
                    )
                    logprobs = CompletionLogprobs(
                        **{
                            k: getattr(scored, k) + getattr(logprobs, k)
                            for k in CompletionLogprobs.model_fields
                        }
                    )
            choices.append(
                CompletionChoice(
                    index=i * req.n + c.index,
                    text=echo[i] + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    body = CompletionResponse(
        id=rid, created=created, model=served.name_for(req.model), choices=choices, usage=usage.usage()
    )
    return JSONResponse(body.model_dump())


async def _completion_chunks(
    served: Served,
    req: CompletionRequest,
    stream: RequestStream,
    rid: str,
    created: int,
    echo: list[str],
    usage: _UsageCount,
) -> AsyncIterator[BaseModel]:
    offsets: dict[int, int] = {}  # text emitted per choice, for logprobs' text_offset
    done: set[int] = set()
    async for i, out in stream:
        choices = []
        for c in out.outputs:
            index = i * req.n + c.index
            if index in done:
                continue
            prefix = echo[i] if index not in offsets else ""
            offset = offsets.setdefault(index, 0)
            logprobs = None
            if req.logprobs is not None and c.delta_token_ids:
                logprobs = completion_logprobs(
                    served.tokens, c.delta_token_ids, _new_logprobs(c), req.logprobs, offset + len(prefix)
                )
            text = prefix + c.delta_text
            offsets[index] = offset + len(text)
            if c.finished:
                done.add(index)
            if text or logprobs or c.finished:
                choices.append(
                    CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        usage.observe(out)
        if choices:
            yield CompletionResponse(
                id=rid, created=created, model=served.name_for(req.model), choices=choices
            )


# ---------------------------------------------------------------- /v1/chat/completions


async def create_chat_completion(served: Served, req: ChatCompletionRequest, request: Request) -> Response:
    prompt = chat_prompt(served, req)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(
        req,
        req.max_new_tokens(),
        top,
        structured=req.structured() or tool_constraint(req),
        adapters=served.adapters,
    )
    await compile_constraint(served, params)
    stream = served.engine.submit([prompt], params)
    rid, created, usage = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), _UsageCount()
    record_usage(request, usage)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _chat_chunks(served, req, stream, rid, created, usage)
        usage_chunk = functools.partial(
            ChatCompletionChunk, id=rid, created=created, model=served.name_for(req.model), choices=[]
        )
        return SSEResponse(_events(stream, chunks, usage, include, lambda u: usage_chunk(usage=u)), stream)
    async with stream:
        finals = await collect(stream, request)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED)
    (out,) = finals
    usage.observe(out)
    choices = []
    for c in out.outputs:
        logprobs = (
            chat_logprobs(served.tokens, c.token_ids, c.logprobs or [], top) if top is not None else None
        )
        message, finish_reason = chat_message(req, c.text, c.finish_reason)
        choices.append(
            ChatChoice(
                index=c.index,
                message=message,
                logprobs=logprobs,
                finish_reason=finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    body = ChatCompletionResponse(
        id=rid, created=created, model=served.name_for(req.model), choices=choices, usage=usage.usage()
    )
    return JSONResponse(body.model_dump())


def chat_message(req: ChatCompletionRequest, text: str, finish_reason: str | None):
    """The assistant message of one choice, with tool calls read from its text, and its finish reason."""
    if not req.uses_tools:
        return ChatMessageOut(content=text), finish_reason
    choice = req.effective_tool_choice
    if isinstance(choice, NamedToolChoice):
        if finish_reason != "stop":  # cut off: the arguments are incomplete, return them as text
            return ChatMessageOut(content=text), finish_reason
        calls = [ToolCall(id=new_call_id(), function={"name": choice.function.name, "arguments": text})]
        return ChatMessageOut(content=None, tool_calls=calls), "stop"
    if choice == "required":
        calls = parse_required(text)
    else:
        content, calls = parse_auto(text, {t.function.name for t in req.tools})
        if calls:
            return ChatMessageOut(content=content, tool_calls=calls), _calls_finish(finish_reason)
    if not calls:
        return ChatMessageOut(content=text), finish_reason
    return ChatMessageOut(content=None, tool_calls=calls), _calls_finish(finish_reason)


def _calls_finish(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _delta_calls(calls: list[ToolCall]) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=i,
            id=c.id,
            type="function",
            function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments),
        )
        for i, c in enumerate(calls)
    ]


class _ChoiceStream:
    """One streamed choice of a chat request with tools: turns its text deltas into content and
    tool-call deltas by the request's tool choice (module `tools` has the rules)."""

    def __init__(self, req: ChatCompletionRequest):
        self.req = req
        self.choice = req.effective_tool_choice
        self.auto = AutoToolStream({t.function.name for t in req.tools}) if self.choice == "auto" else None
        self.text = ""
        self.call_id: str | None = None

    def delta(self, text: str, finish_reason: str | None) -> tuple[DeltaMessage, str | None]:
        self.text += text
        if isinstance(self.choice, NamedToolChoice):
            if self.call_id is None:
                self.call_id = new_call_id()
                call = DeltaToolCall(
                    index=0,
                    id=self.call_id,
                    type="function",
                    function=DeltaFunctionCall(name=self.choice.function.name, arguments=text),
                )
            else:
                call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))
            return DeltaMessage(tool_calls=[call] if text or call.id else None), finish_reason
        if self.auto is not None:
            content = self.auto.feed(text)
            if finish_reason is None:
                return DeltaMessage(content=content or None), None
            rest, calls = self.auto.finish()
            content += rest
            delta = DeltaMessage(content=content or None, tool_calls=_delta_calls(calls) or None)
            return delta, _calls_finish(finish_reason) if calls else finish_reason
        # required: the array is parsed once it is complete
        if finish_reason is None:
            return DeltaMessage(), None
        calls = parse_required(self.text)
        if not calls:
            return DeltaMessage(content=self.text or None), finish_reason
        return DeltaMessage(tool_calls=_delta_calls(calls)), _calls_finish(finish_reason)


async def _chat_chunks(
    served: Served,
    req: ChatCompletionRequest,
    stream: RequestStream,
    rid: str,
    created: int,
    usage: _UsageCount,
) -> AsyncIterator[BaseModel]:
    top = (req.top_logprobs or 0) if req.logprobs else None

    def chunk(choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, created=created, model=served.name_for(req.model), choices=choices)

    # OpenAI opens each choice with the assistant role and empty content.
    yield chunk(
        [ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content="")) for j in range(req.n)]
    )
    done: set[int] = set()
    tools = {j: _ChoiceStream(req) for j in range(req.n)} if req.uses_tools else None
    async for _, out in stream:
        choices = []
        for c in out.outputs:
            if c.index in done:
                continue
            logprobs = None
            if top is not None and c.delta_token_ids:
                logprobs = chat_logprobs(served.tokens, c.delta_token_ids, _new_logprobs(c), top)
            if c.finished:
                done.add(c.index)
            if tools is None:
                delta, finish_reason = DeltaMessage(content=c.delta_text or None), c.finish_reason
            else:
                delta, finish_reason = tools[c.index].delta(c.delta_text, c.finish_reason)
            if delta.content or delta.tool_calls or logprobs or c.finished:
                choices.append(
                    ChatChunkChoice(
                        index=c.index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
                    )
                )
        usage.observe(out)
        if choices:
            yield chunk(choices)
