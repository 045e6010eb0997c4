"""Task files in lm-eval's formats become the prompts lm-eval's task configs make."""

from __future__ import annotations

import json

import pytest

from effllm.core.errors import InputError
from effllm.eval.multiple_choice import MultipleChoiceDoc
from effllm.eval.tasks import load_task


def _write(tmp_path, rows, name="task.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_hellaswag_joins_label_and_contexts_and_strips_wikihow_brackets(tmp_path):
    row = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow tomatoes [title] Pick a spot.",
        "ctx_b": "make sure it is sunny.",
        "endings": ["[step] Water daily.", "Dig   deep.", "a", "b"],
        "label": "1",
    }
    (doc,) = load_task("hellaswag", _write(tmp_path, [row]))
    assert doc == MultipleChoiceDoc(
        context="Home and Garden: How to grow tomatoes. Pick a spot. Make sure it is sunny.",
        choices=(" Water daily.", "Dig  deep.", "a", "b"),
        gold=1,
    )


def test_piqa_asks_the_goal_as_a_question(tmp_path):
    (doc,) = load_task(
        "piqa", _write(tmp_path, [{"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0}])
    )
    assert doc == MultipleChoiceDoc("Question: Open a jar\nAnswer:", ("twist", "shout"), 0)


@pytest.mark.parametrize(
    "row",
    [
        {
            "question": "Which is hot?",
            "choices": {"text": ["ice", "fire"], "label": ["A", "B"]},
            "answerKey": "B",
        },
        {
            "question": {
                "stem": "Which is hot?",
                "choices": [{"text": "ice", "label": "A"}, {"text": "fire", "label": "B"}],
            },
            "answerKey": "B",
        },
    ],
)
def test_arc_reads_hugging_face_and_ai2_layouts(tmp_path, row):
    for task in ("arc_easy", "arc_challenge"):
        (doc,) = load_task(task, _write(tmp_path, [row]))
        assert doc == MultipleChoiceDoc("Question: Which is hot?\nAnswer:", ("ice", "fire"), 1)


def test_mc_reads_context_choices_gold_and_limit_stops_early(tmp_path):
    rows = [{"context": f"c{i}", "choices": ["x", "y"], "gold": 1} for i in range(5)] + ["not json"]
    docs = load_task("mc", _write(tmp_path, rows), limit=3)
    assert [d.context for d in docs] == ["c0", "c1", "c2"]


@pytest.mark.parametrize(
    ("task", "row", "message"),
    [
        ("mc", "{not json", ":1: not JSON"),
        ("piqa", {"goal": "g", "sol1": "a", "label": 0}, ":1: not a piqa document"),
        (
            "hellaswag",
            {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": ""},
            "test split",
        ),
        (
            "arc_easy",
            {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
            "answerKey 'E'",
        ),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, task, row, message):
    with pytest.raises(InputError, match=message):
        load_task(task, _write(tmp_path, [row]))


def test_unknown_task_or_missing_file_raises(tmp_path):
    with pytest.raises(InputError, match="unknown task"):
        load_task("mmlu", _write(tmp_path, []))
    with pytest.raises(InputError, match="not a file"):
        load_task("mc", tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no documents"):
        load_task("mc", _write(tmp_path, []))
