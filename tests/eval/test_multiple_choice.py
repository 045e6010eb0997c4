"""acc takes the likeliest choice, acc_norm the likeliest per character, as lm-eval's multiple_choice does."""

from __future__ import annotations

import math

import pytest

from effllm.core.errors import InputError
from effllm.eval.loglikelihood import loglikelihoods
from effllm.eval.multiple_choice import MultipleChoiceDoc, predictions, score_multiple_choice, summarize


def test_acc_norm_divides_each_loglikelihood_by_the_choice_length_in_characters():
    # -4 over 2 characters is -2 per character; -12 over 8 is -1.5: acc picks the first, acc_norm the second.
    assert predictions([-4.0, -12.0], ["ab", "abcdefgh"]) == (0, 1)


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    assert predictions([-1.0, -1.0, -3.0], ["a", "a", "a"]) == (0, 0)


def test_standard_error_is_sample_std_over_sqrt_n():
    per_doc = [{"pred": p, "pred_norm": 0, "gold": 0} for p in (0, 0, 1, 1, 1)]
    result = summarize(per_doc)
    assert result.acc == pytest.approx(0.4)
    assert result.acc_stderr == pytest.approx(math.sqrt((2 * 0.6**2 + 3 * 0.4**2) / 4 / 5))
    assert result.acc_norm == 1.0 and result.acc_norm_stderr == 0.0


def test_choices_are_scored_after_the_delimiter(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    docs = [
        MultipleChoiceDoc("Anne Elliot was", ("kind", "a very unkind person"), gold=0),
        MultipleChoiceDoc("Sir Walter admired", ("himself", "the navy", "Bath"), gold=2),
    ]
    result = score_multiple_choice(model, tokenizer, docs, batch_size=2)
    for doc, scored in zip(docs, result.per_doc, strict=True):
        expected = [
            ll for ll, _ in loglikelihoods(model, tokenizer, [(doc.context, " " + c) for c in doc.choices])
        ]
        assert scored["loglikelihoods"] == pytest.approx(expected, rel=1e-5)
        assert (scored["pred"], scored["pred_norm"]) == predictions(expected, doc.choices)
    assert result.docs == 2
    assert result.acc == sum(d["pred"] == d["gold"] for d in result.per_doc) / 2


@pytest.mark.parametrize(
    ("choices", "gold", "message"),
    [
        (("only",), 0, "at least two"),
        (("a", ""), 0, "empty"),
        (("a", "b"), 2, "out of range"),
    ],
)
def test_malformed_documents_raise(choices, gold, message):
    with pytest.raises(InputError, match=message):
        MultipleChoiceDoc("context", choices, gold)
