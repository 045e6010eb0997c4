"""Standard multiple-choice tasks read from local jsonl files, one document per line, in the Hugging Face
data set formats lm-evaluation-harness reads, turned into prompts exactly as its task configs do:

- hellaswag (Rowan/hellaswag): activity_label, ctx_a, ctx_b, endings, label. Context
  "{activity_label}: {ctx_a} {ctx_b.capitalize()}", the endings as choices, both cleaned by lm-eval's
  `preprocess` (WikiHow's bracketed artifacts removed).
- piqa (baber/piqa, ybisk/piqa): goal, sol1, sol2, label. Context "Question: {goal}\\nAnswer:".
- arc_easy, arc_challenge (allenai/ai2_arc): question, choices {text, label}, answerKey. Context
  "Question: {question}\\nAnswer:". AI2's own jsonl (question {stem, choices [{text, label}]}) reads too.
- mc (EffLLM's own, e.g. the Persuasion cloze set): context, choices, gold.
Every choice follows its context after one space (lm-eval's target_delimiter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from effllm.core.errors import InputError
from effllm.eval.multiple_choice import MultipleChoiceDoc


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's tasks/hellaswag/utils.py `preprocess`."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> MultipleChoiceDoc:
    context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MultipleChoiceDoc(
        context=_hellaswag_preprocess(context),
        choices=tuple(_hellaswag_preprocess(e) for e in row["endings"]),
        gold=_label(row["label"]),
    )


def piqa_doc(row: dict) -> MultipleChoiceDoc:
    return MultipleChoiceDoc(
        context=f"Question: {row['goal']}\nAnswer:",
        choices=(row["sol1"], row["sol2"]),
        gold=_label(row["label"]),
    )


def arc_doc(row: dict) -> MultipleChoiceDoc:
    question, choices = row["question"], row.get("choices")
    if isinstance(question, dict):  # AI2's own layout
        question, choices = (
            question["stem"],
            {
                "text": [c["text"] for c in question["choices"]],
                "label": [c["label"] for c in question["choices"]],
            },
        )
    if row["answerKey"] not in choices["label"]:
        raise InputError(f"answerKey {row['answerKey']!r} is not one of the labels {choices['label']}")
    return MultipleChoiceDoc(
        context=f"Question: {question}\nAnswer:",
        choices=tuple(choices["text"]),
        gold=choices["label"].index(row["answerKey"]),
    )


def mc_doc(row: dict) -> MultipleChoiceDoc:
    return MultipleChoiceDoc(context=row["context"], choices=tuple(row["choices"]), gold=_label(row["gold"]))


def _label(value) -> int:
    if isinstance(value, str) and not value.strip().isdigit():
        raise InputError(
            f"label {value!r} is not an answer index (a test split without answers cannot be scored)"
        )
    return int(value)


TASKS: dict[str, Callable[[dict], MultipleChoiceDoc]] = {
    "hellaswag": hellaswag_doc,
    "piqa": piqa_doc,
    "arc_easy": arc_doc,
    "arc_challenge": arc_doc,
    "mc": mc_doc,
}


def load_task(task: str, path: str | Path, limit: int | None = None) -> list[MultipleChoiceDoc]:
    """The first `limit` (default all) documents of a jsonl file in `task`'s format."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file; pass the task's jsonl file")
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(TASKS[task](json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{number}: not JSON ({e.msg}); the file must hold one object per line"
                ) from e
            except (KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{path}:{number}: not a {task} document (missing or malformed {e})") from e
            except InputError as e:
                raise InputError(f"{path}:{number}: {e}") from e
    if not docs:
        raise InputError(f"{path} holds no documents")
    return docs
