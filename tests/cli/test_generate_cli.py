"""`effllm generate` and `effllm init-model` from the command line, including bad input."""

import json
import subprocess
import sys

import pytest

from effllm.cli import main
from effllm.cli.init_model import init_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("m") / "tiny")


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("effllm: error: ") and "Traceback" not in err
    return err


def test_generate_streams_greedy_text_deterministically(tiny, capsys):
    assert main(["generate", "Hello", "--model", str(tiny), "--max-tokens", "8"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "Hello", "--model", str(tiny), "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == first and first.endswith("\n")


def test_generate_chat_and_sampling_options_run(tiny, capsys):
    argv = [
        "generate",
        "Hi",
        "--model",
        str(tiny),
        "--chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        "6",
        "--temperature",
        "0.7",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    a = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == a


def test_default_model_is_used_without_model(capsys):
    assert main(["generate", "It was", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_missing_model_folder(tmp_path, capsys):
    assert "does not exist" in _one_line_error(capsys, ["generate", "x", "--model", str(tmp_path / "none")])


def test_truncated_weights(tmp_path, capsys):
    folder = init_model(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert "truncated" in _one_line_error(capsys, ["generate", "x", "--model", str(folder)])


def test_unknown_model_type(tmp_path, capsys):
    folder = init_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "falcon"
    (folder / "config.json").write_text(json.dumps(config))
    assert "llama, qwen2, mistral" in _one_line_error(capsys, ["generate", "x", "--model", str(folder)])


def test_prompt_longer_than_the_context(tiny, capsys):
    err = _one_line_error(capsys, ["generate", "a" * 1500, "--model", str(tiny)])
    assert "1500 tokens" in err and "1024" in err


def test_invalid_sampling_option(tiny, capsys):
    assert "top_p" in _one_line_error(capsys, ["generate", "x", "--model", str(tiny), "--top-p", "0"])


def test_init_model_refuses_a_non_empty_folder(tiny, capsys):
    assert "not empty" in _one_line_error(capsys, ["init-model", str(tiny)])


def test_entry_point_bad_input_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "effllm", "generate", "x", "--model", str(tmp_path / "no")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_stop_string_ends_the_streamed_text_where_it_begins(tiny, capsys):
    assert main(["generate", "Hello", "--model", str(tiny), "--max-tokens", "12"]) == 0
    full = capsys.readouterr().out.rstrip("\n")
    stop = full[3:5]
    assert main(["generate", "Hello", "--model", str(tiny), "--max-tokens", "12", "--stop", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == full[: full.find(stop)]


def test_generate_with_each_constraint(capsys, tmp_path):
    pytest.importorskip("xgrammar")
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"n": {"enum": ["Emma", "Anne"]}}, "required": ["n"]})
    )
    runs = [
        (["--json-schema", str(schema)], lambda out: json.loads(out)["n"] in ("Emma", "Anne")),
        (["--regex", "[a-z]{2,5}!"], lambda out: len(out) <= 6 and out.endswith("!")),
        (["--choice", "yes", "--choice", "no"], lambda out: out in ("yes", "no")),
        (["--grammar", 'root ::= "(" [a-c]+ ")"'], lambda out: out.startswith("(")),
    ]
    for flags, ok in runs:
        assert main(["generate", "It was", "--max-tokens", "24", *flags]) == 0
        out = capsys.readouterr().out.strip()
        assert ok(out), (flags, out)
    err = _one_line_error(capsys, ["generate", "It was", "--regex", "(a"])
    assert "could not be compiled" in err and "regex_converter" not in err
    with pytest.raises(SystemExit):  # argparse: the constraint flags exclude each other
        main(["generate", "It was", "--regex", "a", "--choice", "b"])
