"""`effllm eval`: each subcommand prints a table or JSON, and bad input is an EffLLMError."""

from __future__ import annotations

import argparse
import json

import pytest

from effllm.cli.eval import register
from effllm.core.errors import EffLLMError
from effllm.eval.perplexity import perplexity
from effllm.models import load_model
from effllm.models.tokenizer import load_tokenizer


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="effllm")
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Anne walked to Camden Place. The rain had stopped, and the streets were bright. " * 3)
    return path


def test_perplexity_json_is_the_library_result(byte_model_dir, text_file, capsys):
    assert (
        run(
            "perplexity",
            str(text_file),
            "--model",
            str(byte_model_dir),
            "--max-length",
            "64",
            "--stride",
            "32",
            "--json",
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = (
        load_model(byte_model_dir, dtype="float32", device="cpu"),
        load_tokenizer(byte_model_dir),
    )
    expected = perplexity(model, tokenizer, text_file.read_text(), max_length=64, stride=32)
    assert out["token_perplexity"] == pytest.approx(expected.token_perplexity, rel=1e-5)
    assert out["words"] == expected.words and out["text"] == str(text_file) and out["stride"] == 32


def test_perplexity_table(byte_model_dir, text_file, capsys):
    run("perplexity", str(text_file), "--model", str(byte_model_dir), "--max-length", "64")
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["text", "tokens", "words", "token", "ppl"]
    assert row.split()[-2:] == ["64", "32"]  # window, default stride: half the window


def test_cloze_scores_the_shipped_set(bpe_model_dir, capsys):
    assert run("cloze", "--model", str(bpe_model_dir), "--limit", "4", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "persuasion_cloze" and out["docs"] == 4 and 0 <= out["acc"] <= 1


def test_task_reads_a_jsonl_file(bpe_model_dir, tmp_path, capsys):
    data = tmp_path / "piqa.jsonl"
    data.write_text(
        json.dumps({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout", "label": 0}) + "\n"
    )
    run("task", "--task", "piqa", str(data), "--model", str(bpe_model_dir))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "docs", "acc", "±", "stderr", "acc_norm", "±", "stderr"]
    assert lines[2].split()[:2] == ["piqa", "1"]


def test_bigram_prints_the_baseline(monkeypatch, capsys):
    canned = {
        "model": "word bigram",
        "heldout": "persuasion",
        "word_perplexity": {"whitespace": 538.1},
        "words": {"whitespace": 83283},
        "cloze_acc": 0.482,
        "cloze_acc_stderr": 0.022,
        "cloze_docs": 500,
        "cloze_chance": 0.25,
    }
    monkeypatch.setattr("effllm.eval.baseline.bigram_baseline", lambda: canned)
    run("bigram")
    out = capsys.readouterr().out
    assert "538.1" in out and "0.482" in out and "chance 0.25" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["perplexity", "missing.txt"], "not a file"),
        (["perplexity", "--max-length", "0"], "--max-length must be a positive"),
        (["perplexity", "--max-length", "16", "--stride", "17"], "--stride 17 exceeds"),
        (["perplexity", "--max-length", "100000"], "exceeds the model's context"),
        (["cloze", "--limit", "0"], "--limit must be a positive"),
        (["task", "--task", "mc", "missing.jsonl"], "not a file"),
        (["task", "--task", "mmlu", "missing.jsonl"], "unknown task 'mmlu'"),
    ],
)
def test_bad_input_is_an_effllm_error(byte_model_dir, argv, message):
    with pytest.raises(EffLLMError, match=message):
        run(*argv, "--model", str(byte_model_dir))
