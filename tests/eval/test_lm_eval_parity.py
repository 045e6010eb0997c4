"""Log-likelihoods, acc and acc_norm equal lm-evaluation-harness's own, run on the same tiny checkpoints.

lm-eval (a test-only dependency) loads each checkpoint through transformers with its HFLM class; its task
configs for hellaswag, piqa and arc_easy are pointed at local jsonl files, so the whole pipeline (prompt
construction, tokenization, scoring, metrics) is the harness's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # HFLM needs it

from effllm.eval.loglikelihood import loglikelihoods  # noqa: E402
from effllm.eval.multiple_choice import score_multiple_choice  # noqa: E402
from effllm.eval.perplexity import perplexity  # noqa: E402
from effllm.eval.tasks import load_task  # noqa: E402

DOCS = {
    "hellaswag": [
        {
            "ind": 1,
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman smiles.",
            "ctx_b": "then",
            "endings": [
                ", the man adds wax to the windshield and cuts it.",
                ", a person boards a ski lift.",
                ", the man puts on a christmas coat.",
                ", the man continues removing the snow on his car.",
            ],
            "label": "3",
        },
        {
            "ind": 2,
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
            "ctx_b": "make sure the soil drains.",
            "endings": [
                "[step] Water the plants daily.",
                "Tomatoes need [substeps] six hours of sun.",
                "The plants   grow.",
                "Dig a hole twice as deep.",
            ],
            "label": "1",
        },
        {
            "ind": 3,
            "activity_label": "Baking",
            "ctx_a": "A woman stands in a kitchen.",
            "ctx_b": "she",
            "endings": ["cracks two eggs into a bowl.", "rides a horse.", "sings.", "paints the wall blue."],
            "label": "0",
        },
    ],
    "piqa": [
        {
            "goal": "How do I keep bread fresh?",
            "sol1": "Store it in a sealed bag.",
            "sol2": "Leave it in the rain.",
            "label": 0,
        },
        {
            "goal": "To open a jar easily,",
            "sol1": "freeze the lid.",
            "sol2": "run the lid under hot water.",
            "label": 1,
        },
        {
            "goal": "Make tea",
            "sol1": "Boil water and steep the leaves.",
            "sol2": "Steep leaves in cold sand.",
            "label": 0,
        },
    ],
    "arc_easy": [
        {
            "id": "q1",
            "question": "Which of these is a source of light?",
            "choices": {
                "text": ["the Sun", "a rock", "a shadow", "the ground"],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "A",
        },
        {
            "id": "q2",
            "question": "What do plants need to make food?",
            "choices": {"text": ["sunlight", "darkness", "sand"], "label": ["1", "2", "3"]},
            "answerKey": "1",
        },
        {
            "id": "q3",
            "question": "Water freezes at what temperature in Celsius?",
            "choices": {"text": ["100", "0", "50", "-40"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
    ],
}
MAX_LENGTH = 64  # short, so that long contexts are truncated
LM_EVAL_TASK_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
}


@pytest.fixture(scope="module", autouse=True)
def offline():
    old = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def harness(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", batch_size=4, max_length=MAX_LENGTH)


def _instances(requests):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)
    ]


def test_loglikelihoods_match_lm_eval_harness(harness, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    requests = [
        ("It is a truth universally", " acknowledged"),
        ("Question: how do you grow tomatoes?\nAnswer:", " pick a sunny spot"),
        ("trailing space moves to the continuation ", "here"),
        ("", "An empty context scores from the prefix token."),
        ("A context far longer than the 64-token window, " * 4, " so the harness truncates it from the left"),
    ]
    ours = loglikelihoods(model, tokenizer, requests, batch_size=2, max_length=MAX_LENGTH)
    theirs = harness.loglikelihood(_instances(requests), disable_tqdm=True)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-4)
        assert greedy == ref_greedy


def test_perplexity_with_disjoint_windows_matches_loglikelihood_rolling(model_dir, model_and_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    # lm-eval's rolling loglikelihood would also encode the tokenizer's own BOS after its prefix BOS and
    # predict it; add_bos_token=False leaves the text's tokens after the prefix alone, as ours does.
    harness = HFLM(
        pretrained=str(model_dir), device="cpu", batch_size=4, max_length=MAX_LENGTH, add_bos_token=False
    )
    model, tokenizer = model_and_tokenizer
    text = "Anne Elliot walked along the Cobb at Lyme, and the sea was grey and cold. " * 12
    (ref,) = harness.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True
    )
    ours = perplexity(model, tokenizer, text, max_length=MAX_LENGTH, stride=MAX_LENGTH)
    assert ours.tokens > 2 * MAX_LENGTH  # several windows
    assert -ours.nll == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("task", sorted(DOCS))
def test_multiple_choice_acc_and_acc_norm_match_lm_eval_harness(task, harness, model_and_tokenizer, tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS[task]))
    upstream = Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_TASK_YAML[task]
    (tmp_path / "local.yaml").write_text(
        f"include: {upstream}\ntask: local_{task}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "training_split: null\nvalidation_split: validation\ntest_split: null\n"
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=harness, tasks=[f"local_{task}"], task_manager=manager, num_fewshot=0, log_samples=True
    )
    samples = sorted(out["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
    summary = out["results"][f"local_{task}"]

    model, tokenizer = model_and_tokenizer
    result = score_multiple_choice(
        model, tokenizer, load_task(task, data), batch_size=3, max_length=MAX_LENGTH
    )
    for sample, doc in zip(samples, result.per_doc, strict=True):
        assert doc["loglikelihoods"] == pytest.approx([r[0][0] for r in sample["resps"]], rel=1e-5, abs=1e-4)
        assert float(doc["pred"] == doc["gold"]) == sample["acc"]
        assert float(doc["pred_norm"] == doc["gold"]) == sample["acc_norm"]
    assert result.acc == pytest.approx(summary["acc,none"])
    assert result.acc_norm == pytest.approx(summary["acc_norm,none"])
    assert result.acc_stderr == pytest.approx(summary["acc_stderr,none"])
    assert result.acc_norm_stderr == pytest.approx(summary["acc_norm_stderr,none"])
