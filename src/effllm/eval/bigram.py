"""A word-bigram language model with interpolated Kneser-Ney smoothing: the baseline a trained LM must beat.

Chen & Goodman (1998), "An Empirical Study of Smoothing Techniques for Language Modeling", eq. (17)-(18)
for a bigram, with one absolute discount D and a uniform base distribution over the vocabulary plus one
unknown-word type (so every word, seen or not, gets a probability):

    p(w | v)   = max(c(v w) - D, 0) / c(v) + D * N1+(v .) / c(v) * p_cont(w)    (p_cont(w) when c(v) = 0)
    p_cont(w)  = max(N1+(. w) - D, 0) / N1+(. .) + D * N1+(. *) / N1+(. .) / (|V| + 1)

c(v w) counts the pair in training, c(v) the pairs that start with v, N1+(v .) the distinct words after v,
N1+(. w) the distinct words before w, N1+(. .) the distinct pairs and N1+(. *) the distinct words that
follow anything. Words unseen in training share the unknown type's probability.

What a "word" is, is the `unit`: "whitespace" splits on whitespace, so punctuation and case stay part of
the word and the count of predicted words is exactly the count that per-word perplexity divides by;
"words" takes runs of letters (with inner apostrophes) and drops punctuation, an easier task.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from effllm.core.errors import InputError

WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
UNITS: dict[str, Callable[[str], list[str]]] = {
    "whitespace": str.split,
    "words": WORD_RE.findall,
}


def split_words(text: str, unit: str = "whitespace") -> list[str]:
    """`text` as a list of words of `unit` ("whitespace" or "words", see the module docstring)."""
    if unit not in UNITS:
        raise InputError(f"unknown word unit {unit!r}; choose one of {', '.join(UNITS)}")
    return UNITS[unit](text)


@dataclass(frozen=True)
class BigramPerplexity:
    nll: float  # total negative log-likelihood, nats
    words: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.words)


class BigramLM:
    """Interpolated Kneser-Ney word bigram (see the module docstring); `fit` builds one from text."""

    def __init__(self, words: Sequence[str], unit: str = "whitespace", discount: float = 0.75):
        if len(words) < 2:
            raise InputError("a bigram model needs at least two words of training text")
        self.unit, self.discount = unit, discount
        self.pairs = Counter(pairwise(words))
        self.followers: dict[str, Counter] = defaultdict(Counter)  # v -> {w: c(v w)}
        for (v, w), count in self.pairs.items():
            self.followers[v][w] = count
        self.context_count = {v: sum(after.values()) for v, after in self.followers.items()}  # c(v)
        self.left_types = Counter(w for _, w in self.pairs)  # N1+(. w)
        self.vocab = set(words)

    @classmethod
    def fit(cls, text: str, unit: str = "whitespace", discount: float = 0.75) -> BigramLM:
        return cls(split_words(text, unit), unit, discount)

    def continuation_prob(self, word: str) -> float:
        d, n_pairs = self.discount, len(self.pairs)
        seen = max(self.left_types.get(word, 0) - d, 0.0) / n_pairs
        return seen + d * len(self.left_types) / n_pairs / (len(self.vocab) + 1)

    def prob(self, word: str, previous: str | None) -> float:
        """p(word | previous); `previous=None` (the first word) uses the continuation distribution."""
        lower = self.continuation_prob(word)
        total = self.context_count.get(previous, 0)
        if total == 0:
            return lower
        after = self.followers[previous]
        d = self.discount
        return (max(after.get(word, 0) - d, 0.0) + d * len(after) * lower) / total

    def logprob(self, word: str, previous: str | None) -> float:
        return math.log(self.prob(word, previous))

    def evaluate(self, text: str) -> BigramPerplexity:
        """Total NLL of every word of `text` (the first given no previous word) and the word count."""
        words = split_words(text, self.unit)
        if not words:
            raise InputError("the evaluation text has no words")
        nll = -sum(self.logprob(w, v) for v, w in pairwise([None, *words]))
        return BigramPerplexity(nll=nll, words=len(words))
