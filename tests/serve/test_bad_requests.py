"""Malformed requests each get the right status and OpenAI's error shape, and the server stays healthy."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from effllm.serve.app import build_app
from tests.serve.conftest import MAX_MODEL_LEN, MODEL_NAME

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4, **fields}


def raw(data: bytes):
    return data  # sent as the body as is


C, H = "/v1/completions", "/v1/chat/completions"
# (id, path, body: dict or raw bytes, headers, status, param the error names or None)
CASES = [
    ("negative max_tokens", C, completion(max_tokens=-1), AUTH, 400, "max_tokens"),
    ("zero max_tokens", C, completion(max_tokens=0), AUTH, 400, "max_tokens"),
    ("string max_tokens", C, completion(max_tokens="16"), AUTH, 400, "max_tokens"),
    ("float max_tokens", C, completion(max_tokens=1.5), AUTH, 400, "max_tokens"),
    ("boolean max_tokens", C, completion(max_tokens=True), AUTH, 400, "max_tokens"),
    ("huge temperature", C, completion(temperature=1e9), AUTH, 400, "temperature"),
    ("negative temperature", C, completion(temperature=-0.5), AUTH, 400, "temperature"),
    ("string temperature", C, completion(temperature="hot"), AUTH, 400, "temperature"),
    ("NaN temperature", C, raw(b'{"prompt": "x", "temperature": NaN}'), AUTH, 400, "temperature"),
    ("zero top_p", C, completion(top_p=0), AUTH, 400, "top_p"),
    ("top_p above 1", C, completion(top_p=1.5), AUTH, 400, "top_p"),
    ("huge n", C, completion(n=100000), AUTH, 400, "n"),
    ("zero n", C, completion(n=0), AUTH, 400, "n"),
    ("missing prompt", C, {"model": MODEL_NAME}, AUTH, 400, "prompt"),
    ("integer prompt", C, completion(prompt=123), AUTH, 400, "prompt"),
    ("empty prompt", C, completion(prompt=""), AUTH, 400, "prompt"),
    ("empty token list", C, completion(prompt=[]), AUTH, 400, "prompt"),
    ("negative token id", C, completion(prompt=[-1]), AUTH, 400, "prompt.0"),
    ("token id beyond the vocabulary", C, completion(prompt=[10**6]), AUTH, 400, "prompt"),
    ("one bad prompt in a batch", C, completion(prompt=[[1, 2], [10**6]]), AUTH, 400, "prompt"),
    ("prompt over the context", C, completion(prompt="x" * (MAX_MODEL_LEN + 5)), AUTH, 400, "prompt"),
    (
        "prompt plus max_tokens over the context",
        C,
        completion(prompt="x" * 1000, max_tokens=100),
        AUTH,
        400,
        "prompt",
    ),
    ("empty stop string", C, completion(stop=[""]), AUTH, 400, "stop.0"),
    ("integer stop", C, completion(stop=17), AUTH, 400, "stop"),
    ("too many stop strings", C, completion(stop=[f"s{i}" for i in range(100)]), AUTH, 400, "stop"),
    ("too many logprobs", C, completion(logprobs=100), AUTH, 400, "logprobs"),
    ("presence_penalty out of range", C, completion(presence_penalty=5), AUTH, 400, "presence_penalty"),
    ("frequency_penalty out of range", C, completion(frequency_penalty=-3), AUTH, 400, "frequency_penalty"),
    ("string seed", C, completion(seed="abc"), AUTH, 400, "seed"),
    ("string stream", C, completion(stream="yes"), AUTH, 400, "stream"),
    ("stream_options without stream", C, completion(stream_options={"include_usage": True}), AUTH, 400, None),
    ("top_k below -1", C, completion(top_k=-5), AUTH, 400, "top_k"),
    ("min_p above 1", C, completion(min_p=2), AUTH, 400, "min_p"),
    ("zero repetition_penalty", C, completion(repetition_penalty=0), AUTH, 400, "repetition_penalty"),
    ("logit_bias", C, completion(logit_bias={"1": 5}), AUTH, 400, None),
    ("suffix", C, completion(suffix="end"), AUTH, 400, None),
    ("best_of above n", C, completion(best_of=3), AUTH, 400, None),
    ("invalid JSON", C, raw(b'{"prompt": "x",'), AUTH, 400, None),
    ("JSON array body", C, raw(b"[1, 2, 3]"), AUTH, 400, None),
    ("empty body", C, raw(b""), AUTH, 400, None),
    ("invalid UTF-8", C, raw(b'{"prompt": "\xff\xfe\xfa"}'), AUTH, 400, None),
    ("deeply nested JSON", C, raw(b"[" * 100000 + b"]" * 100000), AUTH, 400, None),
    ("10 MB body", C, raw(b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'), AUTH, 413, None),
    ("unknown model", C, completion(model="gpt-5"), AUTH, 404, "model"),
    ("empty messages", H, chat(messages=[]), AUTH, 400, "messages"),
    ("missing messages", H, {"model": MODEL_NAME}, AUTH, 400, "messages"),
    ("unknown role", H, chat(messages=[{"role": "wizard", "content": "hi"}]), AUTH, 400, "messages.0.role"),
    ("integer content", H, chat(messages=[{"role": "user", "content": 5}]), AUTH, 400, "messages.0.content"),
    (
        "image content",
        H,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        AUTH,
        400,
        "messages.0.content.0.type",
    ),
    ("top_logprobs without logprobs", H, chat(top_logprobs=2), AUTH, 400, None),
    ("too many top_logprobs", H, chat(logprobs=True, top_logprobs=50), AUTH, 400, "top_logprobs"),
    ("zero max_completion_tokens", H, chat(max_completion_tokens=0), AUTH, 400, "max_completion_tokens"),
    (
        "chat over the context",
        H,
        chat(messages=[{"role": "user", "content": "y" * 2000}]),
        AUTH,
        400,
        "messages",
    ),
    ("tool_choice without tools", H, chat(tool_choice="required"), AUTH, 400, None),
    (
        "tool_choice naming an unknown tool",
        H,
        chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        AUTH,
        400,
        None,
    ),
    (
        "tool with a bad name",
        H,
        chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
        AUTH,
        400,
        None,
    ),
    (
        "tool parameters with an unsupported keyword",
        H,
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "minProperties": 1}},
                }
            ],
            tool_choice="required",
        ),
        AUTH,
        400,
        None,
    ),
    ("unknown response_format", H, chat(response_format={"type": "yaml"}), AUTH, 400, "response_format.type"),
    (
        "json_schema format without its schema",
        H,
        chat(response_format={"type": "json_schema"}),
        AUTH,
        400,
        None,
    ),
    ("two constraints", C, completion(regex="a+", choice=["a"]), AUTH, 400, None),
    ("regex that cannot compile", C, completion(regex="(a"), AUTH, 400, None),
    ("grammar that cannot compile", C, completion(grammar="root ::= nothing"), AUTH, 400, None),
    (
        "schema with an unsupported keyword",
        H,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "multipleOf": 2}},
            }
        ),
        AUTH,
        400,
        None,
    ),
    ("empty choice", C, completion(choice=[]), AUTH, 400, "choice"),
    ("embeddings with dimensions", "/v1/embeddings", {"input": "a", "dimensions": 8}, AUTH, 400, None),
    ("embeddings of nothing", "/v1/embeddings", {"input": []}, AUTH, 400, "input"),
    ("embeddings over the context", "/v1/embeddings", {"input": "y" * 2000}, AUTH, 400, "input"),
    (
        "embeddings with unknown pooling",
        "/v1/embeddings",
        {"input": "a", "pooling": "max"},
        AUTH,
        400,
        "pooling",
    ),
    (
        "template kwargs overriding messages",
        H,
        chat(chat_template_kwargs={"messages": []}),
        AUTH,
        400,
        "chat_template_kwargs",
    ),
    ("unknown chat model", H, chat(model="nope"), AUTH, 404, "model"),
    ("missing key", C, completion(), {}, 401, None),
    ("wrong key", C, completion(), {"Authorization": "Bearer nope"}, 401, None),
    ("key without Bearer", C, completion(), {"Authorization": KEY}, 401, None),
    ("wrong key on models", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None),
    ("detokenize beyond the vocabulary", "/detokenize", {"tokens": [10**9]}, AUTH, 400, "tokens"),
    ("tokenize with prompt and messages", "/tokenize", {"prompt": "a", "messages": CHAT}, AUTH, 400, None),
    ("unknown route", "/v1/moderations", completion(), AUTH, 404, None),
    # A lone UTF-16 surrogate, JSON-escaped (it cannot be sent as UTF-8), wherever text enters.
    ("surrogate in the prompt", C, raw(b'{"prompt": "a\\ud800b", "max_tokens": 2}'), AUTH, 400, "prompt"),
    (
        "surrogate in chat content",
        H,
        raw(b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
        AUTH,
        400,
        "messages.0.content",
    ),
    (
        "surrogate in a system message",
        H,
        raw(b'{"messages": [{"role": "system", "content": "x\\ud800"}, {"role": "user", "content": "hi"}]}'),
        AUTH,
        400,
        "messages.0.content",
    ),
    ("surrogate in a stop string", C, raw(b'{"prompt": "hi", "stop": ["\\ud83d"]}'), AUTH, 400, "stop.0"),
    ("surrogate in tokenize", "/tokenize", raw(b'{"prompt": "\\ud800"}'), AUTH, 400, "prompt"),
    ("surrogate in a key", C, raw(b'{"prompt": "hi", "\\ud800": 1}'), AUTH, 400, None),
]


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, served_model_names=MODEL_NAME, api_key=KEY)) as c:
        yield c


def _send(client, path, body, headers):
    if body is None:
        return client.get(path, headers=headers)
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    return client.post(path, json=body, headers=headers)


def test_the_suite_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_status_and_openai_error_shape(client, path, body, headers, status, param):
    r = _send(client, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param
    health = client.get("/health")
    assert health.status_code == 200


def test_server_still_serves_after_the_bad_requests(client):
    for path, body, headers, *_ in [c[1:] for c in CASES]:
        _send(client, path, body, headers)
    r = client.post(C, json=completion(temperature=0), headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert client.get("/health").status_code == 200


def test_chunked_body_over_the_limit_gets_413(engine):
    app = build_app(engine, served_model_names=MODEL_NAME, max_body_bytes=4096)
    chunks = [b'{"prompt": "'] + [b"x" * 1024] * 8 + [b'"}']
    with TestClient(app) as c:
        r = c.post(C, content=iter(chunks), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert c.post(C, json=completion()).status_code == 200


def test_full_queue_gets_429(engine):
    with TestClient(build_app(engine, served_model_names=MODEL_NAME, max_queue=0)) as c:
        r = c.post(C, json=completion())
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert c.get("/health").status_code == 200


def test_tokenize_and_detokenize_round_trip(client):
    ids = client.post("/tokenize", json={"prompt": "héllo"}, headers=AUTH).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == MAX_MODEL_LEN
    assert client.post("/detokenize", json={"tokens": ids["tokens"]}, headers=AUTH).json() == {
        "prompt": "héllo"
    }
    chat_ids = client.post("/tokenize", json={"messages": CHAT}, headers=AUTH).json()["tokens"]
    text = client.post("/detokenize", json={"tokens": chat_ids}, headers=AUTH).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text


def test_error_json_is_parseable_for_a_non_object_error(client):
    r = client.post(C, content=b"null", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and json.loads(r.text)["error"]["code"] == "invalid_json"
