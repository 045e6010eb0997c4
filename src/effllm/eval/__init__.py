"""Evaluation: perplexity, multiple-choice scoring with lm-evaluation-harness semantics, task data, the
shipped corpus and the Persuasion cloze set, and the word-bigram baseline."""

from effllm.eval.bigram import BigramLM
from effllm.eval.loglikelihood import loglikelihoods
from effllm.eval.multiple_choice import MultipleChoiceDoc, MultipleChoiceResult, score_multiple_choice
from effllm.eval.perplexity import PerplexityResult, perplexity
from effllm.eval.tasks import TASKS, load_task

__all__ = [
    "TASKS",
    "BigramLM",
    "MultipleChoiceDoc",
    "MultipleChoiceResult",
    "PerplexityResult",
    "load_task",
    "loglikelihoods",
    "perplexity",
    "score_multiple_choice",
]
