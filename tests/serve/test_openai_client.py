"""The official `openai` client against a real uvicorn server on a loopback port."""

from __future__ import annotations

import httpx
import openai
import pytest

from effllm.engine.sampling_params import SamplingParams
from effllm.serve.app import build_app
from tests.serve.conftest import MODEL_NAME, generate_offline, new_engine, running_server

API_KEY = "test-key"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def reference(engine):
    """Greedy outputs computed offline, before the server takes the engine."""
    tok = engine.tokenizer
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    completion, chat = generate_offline(engine, [tok.encode("Once upon a time"), chat_ids], greedy)
    return {"completion": completion.text, "chat": chat.text, "chat_prompt_tokens": len(chat_ids)}


@pytest.fixture(scope="module")
def base_url(engine, reference):
    app = build_app(engine, served_model_names=MODEL_NAME, api_key=API_KEY)
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def test_completion_matches_offline_greedy_text_and_counts_usage(client, reference, engine):
    out = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0)
    assert out.choices[0].text == reference["completion"]
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(engine.tokenizer.encode("Once upon a time"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 24)
    assert out.usage.total_tokens == prompt_tokens + 24


def test_chat_uses_the_chat_template(client, reference):
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference["chat"]
    assert out.usage.prompt_tokens == reference["chat_prompt_tokens"]
    assert out.usage.completion_tokens == 24


def test_streamed_chat_deltas_concatenate_to_the_non_streamed_greedy_text(client, reference):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["chat"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_streamed_completion_matches_non_streamed(client, reference):
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == reference["completion"]


def test_n_returns_n_choices_with_their_own_samples(client):
    out = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=16, temperature=1.0, n=2, seed=7
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 32
    again = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=16, temperature=1.0, n=2, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, n=2, stream=True, temperature=1.0
    )
    texts = {0: "", 1: ""}
    for chunk in chat:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts.values())


def test_stop_string_cuts_the_text_where_it_begins(client, reference):
    text = reference["completion"]
    start = next(i for i in range(4, len(text) - 2) if text[i : i + 2].strip() == text[i : i + 2])
    stop = text[start : start + 2]
    expected = text[: text.index(stop)]
    out = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop, "\x00never"]
    )
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_logprobs_of_completion_and_chat(client):
    out = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) >= 3
        assert top[token] == logprob == max(top.values())  # greedy: the sampled token is the likeliest
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert bytes(b for c in content for b in c.bytes).decode() == chat.choices[0].message.content


def test_extra_sampling_fields_and_token_prompts(client, engine):
    ids = engine.tokenizer.encode("Once upon a time")
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=ids,
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 8
    batch = client.completions.create(model=MODEL_NAME, prompt=["a", "b"], max_tokens=3, n=2, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both samples of prompt 0 agree


def test_models_and_auth(client, base_url):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    assert httpx.get(f"{base_url}/health").status_code == 200  # no key needed
    assert httpx.get(f"{base_url}/version").json()["version"]


def test_oversized_body_over_a_socket_gets_413(base_url):
    body = b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    r = httpx.post(
        f"{base_url}/v1/completions",
        content=body,
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_usage_reports_accepted_and_rejected_drafts(model_dir, reference):
    """Self-speculation at the model's full depth: every draft is accepted, the text is plain greedy's."""
    engine = new_engine(
        model_dir, speculative_method="early-exit", speculative_exit_layer=2, speculative_adaptive=False
    )
    app = build_app(engine, served_model_names=MODEL_NAME, api_key=API_KEY)
    with (
        running_server(app) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c,
    ):
        r = c.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0)
    assert r.choices[0].text == reference["completion"]
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens == 0
