"""lm-evaluation-harness's own `local-completions` client, pointed at `effllm serve`, scores log-likelihoods
as `effllm eval` does offline (it sends echo + logprobs; needs lm-eval's API extras: aiohttp, tenacity)."""

from __future__ import annotations

import pytest

from effllm.eval.loglikelihood import loglikelihoods
from effllm.models import load_model, load_tokenizer
from effllm.serve.app import build_app
from tests.serve.conftest import MODEL_NAME, running_server

pytest.importorskip("aiohttp")
pytest.importorskip("tenacity")
DOCS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Hello", ", world!"),
    ("It was a", " fine morning"),
]


def test_local_completions_loglikelihood_equals_offline_scores(engine, model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tok = load_model(model_dir, dtype="float32", device="cpu"), load_tokenizer(model_dir)
    offline = loglikelihoods(model, tok, DOCS)
    with running_server(build_app(engine, served_model_names=MODEL_NAME)) as url:
        lm = LocalCompletionsAPI(
            base_url=f"{url}/v1/completions",
            model=MODEL_NAME,
            tokenizer=model_dir,
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            max_length=1024,
            num_concurrent=1,
            max_retries=1,
        )
        requests = [
            Instance(request_type="loglikelihood", doc={}, arguments=doc, idx=i) for i, doc in enumerate(DOCS)
        ]
        served = lm.loglikelihood(requests, disable_tqdm=True)
    for (got, greedy), (expected, expected_greedy) in zip(served, offline, strict=True):
        assert got == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
