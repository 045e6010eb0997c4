"""`echo` with `logprobs` (and `max_tokens: 0`) on /v1/completions: what lm-evaluation-harness's local-completions
model sends for log-likelihood tasks. The continuation's summed prompt logprobs equal `effllm eval`'s offline
scores of the same documents."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from effllm.eval.loglikelihood import encode_pair, loglikelihoods
from effllm.models import load_model, load_tokenizer
from effllm.serve.app import build_app
from tests.serve.conftest import MODEL_NAME

DOCS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Hello", ", world!"),
    ("It was a", " fine morning"),
]


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, served_model_names=MODEL_NAME)) as c:
        yield c


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echoed_prompt_logprobs_equal_the_offline_loglikelihood(client, model_dir, max_tokens):
    model, tok = load_model(model_dir, dtype="float32", device="cpu"), load_tokenizer(model_dir)
    offline = loglikelihoods(model, tok, DOCS)
    for (context, continuation), (expected, _) in zip(DOCS, offline, strict=True):
        ctx, cont = encode_pair(tok, context, continuation)
        body = {
            "model": MODEL_NAME,
            "prompt": ctx + cont,
            "max_tokens": max_tokens,
            "logprobs": 1,
            "echo": True,
            "temperature": 0,
        }
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ctx) + len(cont) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        scored = lp["token_logprobs"][len(ctx) : len(ctx) + len(cont)]
        assert sum(scored) == pytest.approx(expected, abs=1e-4)
        assert choice["text"].startswith(tok.decode(ctx + cont))


def test_max_tokens_zero_without_echo_is_refused(client):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
