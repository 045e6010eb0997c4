"""Continuation log-likelihoods follow lm-eval's rules, checked by hand on a byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from effllm.core.errors import InputError
from effllm.eval.loglikelihood import encode_pair, loglikelihoods, score_continuations


@pytest.fixture(scope="module")
def byte_model(byte_model_dir):
    from effllm.models import load_model
    from effllm.models.tokenizer import load_tokenizer

    return load_model(byte_model_dir, dtype="float32", device="cpu"), load_tokenizer(byte_model_dir)


def _logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i + 1] | tokens[: i + 1]) for each i, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_trailing_space_of_the_context_moves_to_the_continuation(byte_model):
    _, tokenizer = byte_model  # one token per byte, in byte order
    assert encode_pair(tokenizer, "ab ", "c") == ([97, 98], [32, 99])


def test_empty_context_is_the_prefix_token(byte_model):
    _, tokenizer = byte_model  # no BOS: EOS stands for the start
    assert encode_pair(tokenizer, "", "hi") == ([tokenizer.eos_token_id], [104, 105])


def test_loglikelihood_is_the_sum_of_the_continuation_tokens_logprobs(byte_model):
    model, tokenizer = byte_model
    ((ll, _),) = loglikelihoods(model, tokenizer, [("The cat", " sat")])
    expected = _logprobs(model, list(b"The cat sat"))[-4:].sum()
    assert ll == pytest.approx(float(expected), rel=1e-5)


def test_long_context_loses_tokens_from_its_left(byte_model):
    model, tokenizer = byte_model
    context = "x" * 40 + "abcdefghij"
    ((ll, _),) = loglikelihoods(model, tokenizer, [(context, "klm")], max_length=8)
    kept = list(b"efghijklm")  # the last max_length + 1 tokens: the model reads all but the last
    assert ll == pytest.approx(float(_logprobs(model, kept)[-3:].sum()), rel=1e-5)


def test_is_greedy_only_when_every_continuation_token_is_the_argmax(byte_model):
    model, _ = byte_model
    context = list(b"Anne said")
    with torch.no_grad():
        greedy = model(torch.tensor([context]))[0, -1].argmax().item()
    other = (greedy + 1) % 256
    (_, hit), (_, miss) = score_continuations(model, [(context, [greedy]), (context, [other])])
    assert hit and not miss


def test_batching_and_padding_do_not_change_scores(byte_model):
    model, tokenizer = byte_model
    requests = [("a", " short one"), ("a much longer context than the others", " x"), ("mid context", " yz")]
    one_by_one = [loglikelihoods(model, tokenizer, [r])[0][0] for r in requests]
    batched = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size=3)]
    assert batched == pytest.approx(one_by_one, rel=1e-5)


def test_an_empty_continuation_raises(byte_model):
    model, _ = byte_model
    with pytest.raises(InputError, match="no tokens"):
        score_continuations(model, [([1, 2], [])])
