"""The word-bigram baseline on the held-out book: per-word perplexity and cloze accuracy to beat."""

from __future__ import annotations

from effllm.eval.bigram import UNITS, BigramLM
from effllm.eval.cloze import N_CHOICES, bigram_cloze, load_cloze
from effllm.eval.corpus import heldout_text, manifest, training_text


def bigram_baseline() -> dict:
    """Interpolated Kneser-Ney word bigrams trained on the training books and evaluated on the held-out one.

    `word_perplexity[unit]` is per word of that unit ("whitespace": the words per-word LM perplexity counts;
    "words": letters only, punctuation dropped). The cloze accuracy uses the "words" model.
    """
    train, heldout = training_text(), heldout_text()
    perplexity, words = {}, {}
    for unit in UNITS:
        result = BigramLM.fit(train, unit).evaluate(heldout)
        perplexity[unit], words[unit] = result.perplexity, result.words
    cloze = bigram_cloze(BigramLM.fit(train, "words"), load_cloze())
    return {
        "model": "word bigram, interpolated Kneser-Ney (D=0.75)",
        "heldout": manifest()["heldout"],
        "word_perplexity": perplexity,
        "words": words,
        "cloze_acc": cloze.acc,
        "cloze_acc_stderr": cloze.acc_stderr,
        "cloze_docs": cloze.docs,
        "cloze_chance": 1 / N_CHOICES,
    }
