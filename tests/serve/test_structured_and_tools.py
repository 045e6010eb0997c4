"""Structured outputs, tool calls and embeddings through the official `openai` client against a real
server: `response_format`, `tools` with each `tool_choice` (streamed and not), EffLLM's `regex`,
`choice` and `grammar` extensions, and `/v1/embeddings` in float and base64."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import openai
import pytest
import torch

from effllm.engine.embeddings import embed
from effllm.models import load_model
from effllm.serve.app import build_app
from effllm.serve.tools import AutoToolStream, parse_auto
from tests.serve.conftest import MODEL_NAME, new_engine, running_server

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

CHAT = [{"role": "user", "content": "What is the weather in Bath?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Bath", "Lyme"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture(scope="module")
def served(model_dir):
    engine = new_engine(model_dir)
    with running_server(build_app(engine, served_model_names=MODEL_NAME)) as url:
        yield url, engine


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def chat(client, **kwargs):
    kwargs = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 80, "temperature": 0, **kwargs}
    return client.chat.completions.create(**kwargs)


def test_response_format_json_object_and_json_schema(client):
    out = chat(client, response_format={"type": "json_object"}, max_tokens=40)
    # a random model may run out of tokens inside the object; whatever it wrote is a JSON object's prefix
    assert out.choices[0].message.content.startswith("{")
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in range(3):
        out = chat(client, response_format=fmt, temperature=1.0, seed=seed)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), WEATHER)


def test_named_tool_choice_returns_one_call_with_valid_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(client, tools=TOOLS, tool_choice=named)
    message = out.choices[0].message
    assert message.content is None and out.choices[0].finish_reason == "stop"
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    streamed = chat(client, tools=TOOLS, tool_choice=named, stream=True)
    name, arguments, finish = None, "", None
    for chunk in streamed:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            assert delta_call.index == 0
            name = delta_call.function.name or name
            arguments += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", call.function.arguments, "stop")


def test_required_tool_choice_returns_calls_of_the_given_tools(client):
    for seed in range(3):
        out = chat(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
        assert out.choices[0].finish_reason == "tool_calls"
        calls = out.choices[0].message.tool_calls
        assert calls and {c.function.name for c in calls} <= {"get_weather", "get_time"}
        for c in calls:
            if c.function.name == "get_weather":
                jsonschema.validate(json.loads(c.function.arguments), WEATHER)
    plain = chat(client, tools=TOOLS, tool_choice="required", max_tokens=120)
    streamed = list(chat(client, tools=TOOLS, tool_choice="required", max_tokens=120, stream=True))
    calls = [c for chunk in streamed for c in chunk.choices[0].delta.tool_calls or []] if streamed else []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls
    ]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_auto_and_none_leave_the_text_free_and_auto_shows_the_tools(client):
    none = chat(client, tools=TOOLS, tool_choice="none", max_tokens=8)
    bare = chat(client, max_tokens=8)
    assert none.choices[0].message.content == bare.choices[0].message.content
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens  # "none" does not show the tools
    auto = chat(client, tools=TOOLS, max_tokens=8)  # auto is the default with tools
    assert auto.usage.prompt_tokens > bare.usage.prompt_tokens + 50  # the tools' system message
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"


def test_auto_tool_calls_are_parsed_from_text_streamed_or_not():
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bath", "celsius": true}}\n'
        '</tool_call>\n<tool_call>{"name": "nope", "arguments": {}}</tool_call> done'
    )
    content, calls = parse_auto(text, {"get_weather"})
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Bath", "celsius": True}
    assert content == 'Let me look.\n\n<tool_call>{"name": "nope", "arguments": {}}</tool_call> done'
    for size in (1, 3, 7, 1000):  # any chunking streams the same content and calls
        stream = AutoToolStream({"get_weather"})
        sent = "".join(stream.feed(text[i : i + size]) for i in range(0, len(text), size))
        assert sent == "Let me look.\n"
        rest, streamed_calls = stream.finish()
        assert [c.function.arguments for c in streamed_calls] == [c.function.arguments for c in calls]
        assert (sent + rest).strip() == content.replace("\n\n", "").replace(
            "Let me look.", "Let me look.\n"
        ).strip() or rest
    plain = AutoToolStream({"f"})
    assert plain.feed("a <tool") == "a " and plain.feed("box> b") == "<toolbox> b"
    assert plain.finish() == ("", [])


def test_regex_choice_and_grammar_extensions_on_completions(client):
    out = client.completions.create(
        model=MODEL_NAME,
        prompt="Call",
        max_tokens=20,
        temperature=1.0,
        seed=1,
        extra_body={"regex": r"\d{3}-\d{4}"},
    )
    assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text) and out.choices[0].finish_reason == "stop"
    out = client.completions.create(
        model=MODEL_NAME,
        prompt="Pick",
        max_tokens=10,
        extra_body={"choice": ["left", "right"]},
        n=4,
        temperature=1.0,
        seed=2,
    )
    assert {c.text for c in out.choices} <= {"left", "right"}
    grammar = 'root ::= "(" [a-c]+ ")"'
    out = client.completions.create(
        model=MODEL_NAME, prompt="x", max_tokens=12, temperature=1.0, seed=3, extra_body={"grammar": grammar}
    )
    assert re.fullmatch(r"\([a-c]+\)", out.choices[0].text) or out.choices[0].finish_reason == "length"


def test_embeddings_float_and_base64_equal_the_pooled_hidden_states(client, served, model_dir):
    texts = ["It is a truth universally acknowledged", "Emma"]
    out = client.embeddings.create(model=MODEL_NAME, input=texts)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    tokenizer = served[1].tokenizer
    expected = embed(model, [tokenizer.encode(t) for t in texts])
    got = torch.tensor([d.embedding for d in out.data])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert [d.index for d in out.data] == [0, 1]
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    b64 = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data]
    torch.testing.assert_close(torch.tensor(np.stack(decoded)), got)
    ids = client.embeddings.create(model=MODEL_NAME, input=[[5, 6, 7]], extra_body={"pooling": "last"})
    torch.testing.assert_close(torch.tensor(ids.data[0].embedding), embed(model, [[5, 6, 7]], "last")[0])
    assert abs(float(got[0].norm()) - 1) < 1e-5


def test_bad_constraints_are_openai_shaped_400s(client):
    with pytest.raises(openai.BadRequestError, match="multipleOf"):
        chat(
            client,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"multipleOf": 2}},
            },
        )
    with pytest.raises(openai.BadRequestError, match="could not be compiled"):
        client.completions.create(model=MODEL_NAME, prompt="a", extra_body={"regex": "[z-a]"})
