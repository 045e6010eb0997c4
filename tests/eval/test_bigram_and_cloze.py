"""The Kneser-Ney bigram is a proper distribution; the shipped cloze set is what its generator makes."""

from __future__ import annotations

import json
import re

import pytest

from effllm.eval.baseline import bigram_baseline
from effllm.eval.bigram import BigramLM, split_words
from effllm.eval.cloze import CLOZE_FILE, N_ITEMS, build_cloze_items, load_cloze, paragraphs, word_followers
from effllm.eval.corpus import heldout_text, training_text

TOY = "the cat sat on the mat . the dog sat on the cat . a dog ran"


@pytest.mark.parametrize("previous", ["the", "sat", "ran", "unseen", None])
def test_bigram_probabilities_sum_to_one_over_the_vocabulary_and_unknown(previous):
    lm = BigramLM.fit(TOY)
    total = sum(lm.prob(w, previous) for w in lm.vocab) + lm.prob("<never seen>", previous)
    assert total == pytest.approx(1.0)


def test_bigram_probability_matches_the_interpolated_kneser_ney_formula_by_hand():
    lm = BigramLM.fit(TOY)
    # c(the cat) = 2; 4 pairs start with "the", and 3 distinct words follow it (cat, mat, dog).
    # "cat" follows 1 distinct word ("the"); there are 13 distinct pairs, 9 distinct words follow something,
    # and the vocabulary has 9 words (+1 for the unknown word).
    p_cont = (1 - 0.75) / 13 + 0.75 * 9 / 13 / 10
    assert lm.continuation_prob("cat") == pytest.approx(p_cont)
    assert lm.prob("cat", "the") == pytest.approx((2 - 0.75) / 4 + 0.75 * 3 / 4 * p_cont)


def test_word_units_keep_or_drop_punctuation():
    assert split_words('"Yes," said Anne.', "whitespace") == ['"Yes,"', "said", "Anne."]
    assert split_words('"Yes," said Anne\'s.', "words") == ["Yes", "said", "Anne's"]


def test_bigram_baseline_on_persuasion():
    result = bigram_baseline()
    assert result["words"] == {"whitespace": 83283, "words": 83614}
    assert result["word_perplexity"]["whitespace"] == pytest.approx(538.1, abs=0.1)
    assert result["word_perplexity"]["words"] == pytest.approx(322.9, abs=0.1)
    assert result["cloze_acc"] == pytest.approx(0.482) and result["cloze_docs"] == N_ITEMS


def test_shipped_cloze_set_is_what_the_generator_makes_with_its_seed():
    shipped = [json.loads(line) for line in CLOZE_FILE.read_text(encoding="utf-8").splitlines()]
    assert shipped == build_cloze_items(training_text(), heldout_text())


def test_cloze_targets_end_persuasion_sentences_and_distractors_follow_the_same_word_in_training():
    followers = word_followers(training_text())
    held_out = "\n".join(paragraphs(heldout_text()))
    docs = load_cloze()
    assert len(docs) == N_ITEMS and len({d.context for d in docs}) == N_ITEMS
    for doc in docs:
        previous = doc.context.split()[-1]
        target = doc.choices[doc.gold]
        assert len(set(doc.choices)) == 4
        assert re.search(re.escape(f"{doc.context} {target}") + r"[.!?]", held_out)
        assert all(followers[previous][w] > 0 for i, w in enumerate(doc.choices) if i != doc.gold)
    golds = [d.gold for d in docs]
    assert all(abs(golds.count(i) / N_ITEMS - 0.25) < 0.06 for i in range(4))  # shuffled: no position bias


def test_cloze_limit_reads_the_first_items():
    assert [d.context for d in load_cloze(limit=3)] == [d.context for d in load_cloze()[:3]]
