"""Random JSON bodies built from the request schemas, with random types, values and Unicode (lone surrogates
included), at every route: never a 500; always a valid response or an OpenAI-shaped error; and the server
answers a valid request afterwards."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.serve.app import build_app
from effllm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from tests.serve.conftest import MODEL_NAME

ROUTES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
TEXT = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([0, -1, 2**31, 2**64, 10**9]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    TEXT,
    st.sampled_from(["", MODEL_NAME, "user"]),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
        "content": st.one_of(TEXT, SCALARS),
    }
)
VALUES = st.recursive(
    SCALARS | MESSAGE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


def fields(model) -> list[str]:
    return list(model.model_json_schema()["properties"])


@st.composite
def bodies(draw):
    path = draw(st.sampled_from(list(ROUTES)))
    names = fields(ROUTES[path])
    body = draw(st.dictionaries(st.sampled_from(names + ["unexpected"]), VALUES, max_size=5))
    body.setdefault("model", MODEL_NAME)
    if "regex" in names and draw(st.booleans()):  # constraints that reach the grammar compiler
        body.update(
            draw(
                st.one_of(
                    st.fixed_dictionaries({"regex": TEXT}),
                    st.fixed_dictionaries({"grammar": st.one_of(TEXT, TEXT.map(lambda t: f"root ::= {t}"))}),
                    st.fixed_dictionaries({"choice": st.lists(TEXT, max_size=3)}),
                    st.fixed_dictionaries(
                        {
                            "response_format": st.fixed_dictionaries(
                                {
                                    "type": st.just("json_schema"),
                                    "json_schema": st.fixed_dictionaries(
                                        {"name": st.just("n"), "schema": VALUES}
                                    ),
                                }
                            )
                        }
                    ),
                )
            )
        )
    if draw(st.booleans()) and "max_tokens" in names:
        body["max_tokens"] = draw(st.integers(-2, 8))
    for key in (
        "max_tokens",
        "max_completion_tokens",
    ):  # keep generations short (a 400 past the context anyway)
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 8:
            body[key] = 8
    return path, body


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, served_model_names=MODEL_NAME), raise_server_exceptions=False) as c:
        yield c


def check_response(r) -> None:
    assert r.status_code < 500, r.text[:500]
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bodies())
def test_random_bodies_never_get_a_500(client, case):
    path, body = case
    raw = json.dumps(
        body, ensure_ascii=True
    ).encode()  # ensure_ascii: lone surrogates travel as \\udXXX escapes
    check_response(client.post(path, content=raw, headers={"Content-Type": "application/json"}))


def test_the_server_still_answers_after_the_fuzzing(client):
    for path in ("/health", "/v1/models", "/version", "/metrics"):
        assert client.get(path).status_code == 200
    r = client.post(
        "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
