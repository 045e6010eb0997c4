"""Multiple-choice scoring with lm-evaluation-harness semantics: acc and acc_norm.

Each choice is scored by log p(delimiter + choice | context) (see `loglikelihood`). `acc` counts documents
whose highest-scoring choice is the gold one; `acc_norm` first divides each score by the choice's length in
characters (without the delimiter), as lm-eval's `multiple_choice` output type does. Both come with lm-eval's
standard error of the mean (sample standard deviation over sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from effllm.core.errors import InputError
from effllm.eval.loglikelihood import loglikelihoods


@dataclass(frozen=True)
class MultipleChoiceDoc:
    """One question: the model reads `context` and each of `choices` follows it after `delimiter`."""

    context: str
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "  # lm-eval's target_delimiter

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise InputError(
                f"a multiple-choice document needs at least two choices, got {len(self.choices)}"
            )
        if not all(self.choices):
            raise InputError("a choice is empty; every choice must be non-empty text")
        if not 0 <= self.gold < len(self.choices):
            raise InputError(f"gold index {self.gold} is out of range for {len(self.choices)} choices")


@dataclass
class MultipleChoiceResult:
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    docs: int
    # per document: {"loglikelihoods": [...], "pred": i, "pred_norm": j, "gold": k}
    per_doc: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, per_doc: bool = False) -> dict:
        out = {
            "docs": self.docs,
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": self.acc_norm_stderr,
        }
        return {**out, "per_doc": self.per_doc} if per_doc else out


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of log-likelihood per character); ties go to the first."""
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    pred_norm = max(range(len(lls)), key=lambda i: (norm[i], -i))
    return pred, pred_norm


def score_multiple_choice(
    model,
    tokenizer,
    docs: Sequence[MultipleChoiceDoc],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> MultipleChoiceResult:
    """acc and acc_norm of the model on `docs` (see the module docstring)."""
    if not docs:
        raise InputError("no documents to score")
    requests = [(doc.context, doc.delimiter + choice) for doc in docs for choice in doc.choices]
    results = loglikelihoods(
        model, tokenizer, requests, batch_size=batch_size, max_length=max_length, progress=progress
    )
    per_doc, at = [], 0
    for doc in docs:
        lls = [ll for ll, _ in results[at : at + len(doc.choices)]]
        at += len(doc.choices)
        pred, pred_norm = predictions(lls, doc.choices)
        per_doc.append({"loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm, "gold": doc.gold})
    return summarize(per_doc)


def summarize(per_doc: list[dict]) -> MultipleChoiceResult:
    """acc and acc_norm with their standard errors from per-document predictions."""
    acc = [float(d["pred"] == d["gold"]) for d in per_doc]
    acc_norm = [float(d["pred_norm"] == d["gold"]) for d in per_doc]
    return MultipleChoiceResult(
        acc=_mean(acc),
        acc_stderr=_stderr(acc),
        acc_norm=_mean(acc_norm),
        acc_norm_stderr=_stderr(acc_norm),
        docs=len(per_doc),
        per_doc=per_doc,
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation (n - 1) over sqrt(n); 0 for one document."""
    n = len(xs)
    if n < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)
