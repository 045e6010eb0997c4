"""`effllm compress quantize` from the command line: a loadable checkpoint, the report, bad input."""

import json

import pytest

from effllm.cli import main
from effllm.cli.init_model import init_model
from effllm.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("m") / "tiny")


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("effllm: error: ") and "Traceback" not in err
    return err


def test_quantize_writes_a_checkpoint_that_generate_runs(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(
            [
                "compress",
                "quantize",
                "--model",
                str(tiny),
                "--scheme",
                "w4a16",
                "--out",
                str(out),
                "--no-report",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert type(load_model(out, device="cpu").model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert main(["generate", "Hello", "--model", str(out), "--max-tokens", "4"]) == 0


def test_gptq_with_calibration_file_and_the_report(tiny, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} of some calibration text."}) for i in range(50)))
    out = tmp_path / "q"
    argv = [
        "compress",
        "quantize",
        "--model",
        str(tiny),
        "--scheme",
        "w8a8",
        "--method",
        "gptq",
        "--out",
        str(out),
        "--calibration-data",
        str(data),
        "--num-samples",
        "4",
        "--calibration-seq-len",
        "32",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    assert report["perplexity_after"] > 0 and report["decode_tokens_per_s_after"] > 0


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    base = ["compress", "quantize", "--model", str(tiny), "--out", str(out), "--no-report"]
    err = _one_line_error(capsys, [*base, "--scheme", "w4a16", "--group-size", "128"])
    assert "q_proj: in_features 64 is not divisible by group size 128; choose --group-size 32 or 64" in err
    assert not out.exists()
    assert "does not apply to W4A16" in _one_line_error(
        capsys, [*base, "--scheme", "w4a16", "--method", "smoothquant"]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    err = _one_line_error(
        capsys, [*base, "--scheme", "w8a16", "--method", "awq", "--calibration-data", str(bad)]
    )
    assert "bad.jsonl:1 is not a JSON object with a 'text' string" in err and not out.exists()
    out.mkdir()
    assert "already exists" in _one_line_error(capsys, [*base, "--scheme", "w8a16"])


def test_gguf_format_writes_a_gguf_file(tiny, tmp_path, capsys):
    pytest.importorskip("gguf")
    out = tmp_path / "g"
    argv = ["compress", "quantize", "--scheme", "w4a16", "--format", "gguf", "--no-report"]
    assert main([*argv, "--out", str(out)]) == 0  # the default model: a trained BPE tokenizer
    assert (out / "model.gguf").stat().st_size > 0
    err = _one_line_error(capsys, [*argv, "--group-size", "64", "--out", str(tmp_path / "h")])
    assert "GGUF blocks hold 32 weights" in err and not (tmp_path / "h").exists()
    err = _one_line_error(capsys, [*argv, "--model", str(tiny), "--out", str(tmp_path / "b")])
    assert "no BPE merges" in err and not (tmp_path / "b").exists()


def test_qoq_writes_effllm_s_own_section_and_serves_with_the_int4_cache(tiny, tmp_path, capsys):
    out = tmp_path / "qoq"
    argv = ["compress", "quantize", "--model", str(tiny), "--scheme", "w4a8kv4", "--group-size", "64"]
    argv += ["--num-samples", "4", "--calibration-seq-len", "32", "--out", str(out), "--no-report"]
    assert main(argv) == 0
    section = json.loads((out / "config.json").read_text())["quantization_config"]
    assert section["format"] == "qoq" and section["kv_cache_dtype"] == "int4"
    assert section["steps"]["smooth_attention"] and section["effllm_method"] == "gptq"
    assert type(load_model(out, device="cpu").model.layers[0].mlp.down_proj).__name__ == "QoQLinear"
    assert main(["generate", "Hello", "--model", str(out), "--max-tokens", "4"]) == 0
    text = tmp_path / "t.txt"
    text.write_text(
        "It is a truth universally acknowledged, that a single man in possession of a fortune. " * 8
    )
    capsys.readouterr()
    assert main(["eval", "perplexity", str(text), "--model", str(out), "--max-length", "64", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)["token_perplexity"]
    argv = [
        "eval",
        "perplexity",
        str(text),
        "--model",
        str(out),
        "--max-length",
        "64",
        "--kv-cache-dtype",
        "int8",
    ]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_perplexity"] != scored  # auto meant int4 here


def test_qoq_flags_are_refused_for_other_schemes(tiny, tmp_path, capsys):
    err = _one_line_error(
        capsys,
        [
            "compress",
            "quantize",
            "--model",
            str(tiny),
            "--scheme",
            "w4a16",
            "--clip",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert "w4a8" in err


def test_prune_wanda_2_4_with_the_report(tiny, tmp_path, capsys):
    out = tmp_path / "p"
    argv = [
        "compress",
        "prune",
        "--model",
        str(tiny),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--out",
        str(out),
    ]
    assert main([*argv, "--num-samples", "4", "--calibration-seq-len", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["linear_zero_share"] == pytest.approx(0.5) and report["perplexity_after"] > 0
    assert main(["generate", "Hello", "--model", str(out), "--max-tokens", "4"]) == 0


def test_prune_llm_pruner_writes_a_smaller_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["compress", "prune", "--model", str(tiny), "--method", "llm-pruner", "--ratio", "0.25"]
    assert (
        main([*argv, "--out", str(out), "--num-samples", "2", "--calibration-seq-len", "32", "--no-report"])
        == 0
    )
    assert "parameters" in capsys.readouterr().out
    small = load_model(out, device="cpu")
    assert small.config.intermediate_size == load_model(tiny, device="cpu").config.intermediate_size * 3 // 4
    err = _one_line_error(capsys, [*argv[:-2], "--pattern", "3:2", "--out", str(tmp_path / "x")])
    assert "N:M" in err and not (tmp_path / "x").exists()


def test_palettize_writes_a_palettized_checkpoint_with_the_report(tiny, tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["compress", "palettize", "--model", str(tiny), "--bits", "3", "--rows-per-palette", "16"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["format"] == "palettized" and report["weight_bytes_after"] < report["weight_bytes_before"] / 2
    )
    assert report["perplexity_after"] > 0 and report["decode_tokens_per_s_after"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["effllm"]["compression"] == {
        "format": "palettized",
        "bits": 3,
        "rows_per_palette": 16,
        "ignore": ["lm_head"],
    }
    down = load_model(out, device="cpu").model.layers[0].mlp.down_proj
    assert type(down).__name__ == "PalettizedLinear" and down.palette.shape[1] == 8
    assert main(["generate", "Hello", "--model", str(out), "--max-tokens", "4"]) == 0
    _one_line_error(
        capsys, [*argv[:-2], "--model", str(out), "--out", str(tmp_path / "again"), "--no-report"]
    )
    _one_line_error(capsys, [*argv[:-1], "7", "--out", str(tmp_path / "odd"), "--no-report"])
    assert not (tmp_path / "odd").exists()
