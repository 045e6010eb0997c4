"""Perplexity is exp of the mean token NLL; sliding windows score every token once, with enough context."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from effllm.core.errors import InputError
from effllm.eval.loglikelihood import prefix_token_id
from effllm.eval.perplexity import perplexity, rolling_windows

TEXT = "Captain Wentworth had no fortune. He had been lucky in his profession; but spending freely. " * 3


def _sequence(tokenizer, text):
    return [prefix_token_id(tokenizer), *tokenizer.encode(text, add_special_tokens=False)]


def _direct_nll(model, tokens: list[int]) -> torch.Tensor:
    """Per-token NLL of tokens[1:] from one plain forward over all of them: [len(tokens) - 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].float()
    return F.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="none")


def test_perplexity_equals_exp_of_mean_token_nll_computed_directly(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sequence = _sequence(tokenizer, TEXT)
    nll = _direct_nll(model, sequence)
    result = perplexity(model, tokenizer, TEXT, max_length=len(sequence))
    assert result.tokens == len(sequence) - 1
    assert result.nll == pytest.approx(float(nll.sum()), rel=1e-5)
    assert result.token_perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_per_word_perplexity_spreads_the_same_nll_over_whitespace_words(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = perplexity(model, tokenizer, TEXT)
    assert result.words == len(TEXT.split())
    assert result.word_perplexity == pytest.approx(math.exp(result.nll / len(TEXT.split())))
    assert result.bits_per_byte == pytest.approx(result.nll / len(TEXT.encode()) / math.log(2))


@pytest.mark.parametrize("stride", [7, 16, 32])
def test_sliding_window_nll_is_the_sum_of_each_windows_new_tokens(model_and_tokenizer, stride):
    model, tokenizer = model_and_tokenizer
    sequence, max_length = _sequence(tokenizer, TEXT), 32
    expected = 0.0
    for begin, end, n_scored in rolling_windows(len(sequence), max_length, stride):
        expected += float(_direct_nll(model, sequence[begin : end + 1])[-n_scored:].sum())
    result = perplexity(model, tokenizer, TEXT, max_length=max_length, stride=stride, batch_size=3)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.tokens == len(sequence) - 1


def test_stride_does_not_matter_when_the_text_fits_one_window(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    n = len(_sequence(tokenizer, TEXT))
    whole = perplexity(model, tokenizer, TEXT, max_length=n, stride=n)
    half = perplexity(model, tokenizer, TEXT, max_length=n, stride=n // 2, batch_size=1)
    assert whole.nll == pytest.approx(half.nll, rel=1e-5)


@given(n_tokens=st.integers(2, 300), max_length=st.integers(1, 64), data=st.data())
def test_rolling_windows_score_every_token_once_with_at_least_window_minus_stride_context(
    n_tokens, max_length, data
):
    stride = data.draw(st.integers(1, max_length))
    windows = rolling_windows(n_tokens, max_length, stride)
    scored = []
    for begin, end, n_scored in windows:
        assert 0 <= begin < end and end - begin <= max_length and 1 <= n_scored <= end - begin
        targets = range(end - n_scored + 1, end + 1)  # sequence positions predicted by this window
        for t in targets:
            assert t - begin >= min(t, max_length - stride + 1)  # tokens read before predicting t
        scored += targets
    assert scored == list(range(1, n_tokens))


def test_bad_stride_or_too_short_text_raises(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(InputError, match="stride"):
        perplexity(model, tokenizer, TEXT, max_length=16, stride=17)
    with pytest.raises(InputError, match="too short"):
        perplexity(model, tokenizer, "")
