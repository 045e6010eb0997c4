"""The Persuasion cloze set: pick the last word of a held-out sentence among four, as in LAMBADA.

Each item is a sentence of *Persuasion* (the held-out book) that ends "... previous target." The model reads
the sentence up to `previous`, with earlier sentences of its paragraph while they fit in MAX_CONTEXT_WORDS,
and scores four words: the target and three distractors drawn uniformly from the distinct words that follow
`previous` (with only a space between) somewhere in the training books. So every choice is a possible next
word given the last word alone; a word-bigram model, which sees only that word, scores 0.48 (chance 0.25),
and doing better takes the sentence's meaning. (Drawing distractors by frequency instead would make them
likelier than the target under the bigram, which would then score below chance.)

`build_cloze_items` makes the set from the corpus with a fixed seed; scripts/corpus/build_cloze.py writes it
to effllm/assets/eval/persuasion_cloze.jsonl (the "mc" task format), which `load_cloze` reads.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from effllm.eval.bigram import WORD_RE, BigramLM
from effllm.eval.multiple_choice import MultipleChoiceDoc, MultipleChoiceResult, predictions, summarize
from effllm.eval.tasks import load_task

CLOZE_FILE = Path(__file__).resolve().parent.parent / "assets" / "eval" / "persuasion_cloze.jsonl"
SEED = 1818  # the year on Persuasion's title page
N_ITEMS = 500
N_CHOICES = 4
MAX_CONTEXT_WORDS = 100
MIN_SENTENCE_WORDS = 6  # words of the target's sentence before the target
ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Rev", "Hon", "Esq", "Capt", "Col", "Sir"})

_WORD = WORD_RE.pattern
# "previous target" closing a sentence; `previous` stands alone (no quote or bracket before it).
_TARGET = re.compile(rf"(?<!\S)({_WORD}) ({_WORD})(?=[.!?]+[\"')_]*(?:\s|$))")
_SENTENCE_END = re.compile(r"[.!?]+[\"')_]*(?=\s|$)")
_WORD_THEN_PUNCTUATION = re.compile(rf"({_WORD})[^\sA-Za-z]*")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each unwrapped onto one line."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def sentence_starts(paragraph: str) -> list[int]:
    """Offsets where the sentences of `paragraph` begin (a full stop after "Mr" and the like ends none)."""
    starts = [0]
    for m in _SENTENCE_END.finditer(paragraph):
        before = WORD_RE.findall(paragraph[: m.start()][-12:])
        if m.group().startswith(".") and before and (before[-1] in ABBREVIATIONS or len(before[-1]) == 1):
            continue
        if m.end() < len(paragraph):
            starts.append(m.end() + 1)
    return starts


def word_followers(text: str) -> dict[str, Counter]:
    """{v: {w: count}} over whitespace-separated pairs "v w" of `text` where v is a bare word and w a word,
    perhaps with punctuation after it: the words seen right after v within a clause."""
    followers: dict[str, Counter] = defaultdict(Counter)
    for v, w in pairwise(text.split()):
        if WORD_RE.fullmatch(v) and (m := _WORD_THEN_PUNCTUATION.fullmatch(w)):
            followers[v][m.group(1)] += 1
    return followers


def _candidates(heldout_text: str) -> list[tuple[str, str, str]]:
    """(context, previous, target) for every eligible sentence end of the held-out text, in text order."""
    out = []
    for paragraph in paragraphs(heldout_text):
        starts = sentence_starts(paragraph)
        for m in _TARGET.finditer(paragraph):
            previous, target = m.group(1), m.group(2)
            if target in ABBREVIATIONS or len(target) == 1:
                continue
            context_end = m.end(1)
            own = max(s for s in starts if s <= m.start())
            if len(paragraph[own:context_end].split()) < MIN_SENTENCE_WORDS:
                continue
            begin = own
            for s in sorted((s for s in starts if s < own), reverse=True):
                if len(paragraph[s:context_end].split()) > MAX_CONTEXT_WORDS:
                    break
                begin = s
            out.append((paragraph[begin:context_end], previous, target))
    return out


def build_cloze_items(train_text: str, heldout_text: str, n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """`n` four-way last-word items from `heldout_text`, distractors from `train_text`'s bigrams (see the
    module docstring). The same texts and seed give the same items."""
    followers = word_followers(train_text)
    rng = random.Random(seed)
    eligible = [
        c for c in _candidates(heldout_text) if len(set(followers.get(c[1], {})) - {c[2]}) >= N_CHOICES - 1
    ]
    chosen = sorted(rng.sample(range(len(eligible)), n))
    items = []
    for number, index in enumerate(chosen, 1):
        context, previous, target = eligible[index]
        pool = sorted(set(followers[previous]) - {target})
        choices = [target, *rng.sample(pool, N_CHOICES - 1)]
        rng.shuffle(choices)
        items.append(
            {
                "id": f"persuasion-{number:03d}",
                "context": context,
                "choices": choices,
                "gold": choices.index(target),
            }
        )
    return items


def load_cloze(limit: int | None = None) -> list[MultipleChoiceDoc]:
    """The shipped Persuasion cloze set (its first `limit` items if given)."""
    return load_task("mc", CLOZE_FILE, limit)


def bigram_cloze(lm: BigramLM, docs: Sequence[MultipleChoiceDoc]) -> MultipleChoiceResult:
    """acc of a word-bigram model on cloze items: each choice scored by log p(choice | last word of context)."""
    per_doc = []
    for doc in docs:
        previous = WORD_RE.findall(doc.context)[-1]
        lls = [lm.logprob(choice, previous) for choice in doc.choices]
        pred, pred_norm = predictions(lls, doc.choices)
        per_doc.append({"loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm, "gold": doc.gold})
    return summarize(per_doc)
