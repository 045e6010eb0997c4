import argparse
import json

import pytest

from effllm.analyze.shapes import PRESETS
from effllm.cli.analyze import register
from effllm.core.errors import EffLLMError


def run(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="effllm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.fixture
def config_only_folder(tmp_path):
    folder = tmp_path / "smollm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PRESETS["smollm-135m"]))
    return folder


def test_roofline_json_has_layers_and_total_for_a_folder_holding_only_config_json(capsys, config_only_folder):
    out = run(
        capsys,
        "roofline",
        "--model",
        str(config_only_folder),
        "--hardware",
        "rtx4090",
        "--phase",
        "decode",
        "--batch",
        "8",
        "--context",
        "512",
        "--json",
    )
    data = json.loads(out)
    assert {"ops", "bytes", "time_s", "bound"} <= set(data["total"])
    assert [layer["name"] for layer in data["layers"]][-1] == "lm_head"
    assert data["batch"] == 8 and data["context"] == 512


def test_roofline_table_and_plot(capsys, tmp_path):
    png = tmp_path / "roofline.png"
    out = run(
        capsys,
        "roofline",
        "--model",
        "llama-7b",
        "--hardware",
        "a100-80g",
        "--phase",
        "generate",
        "--prompt",
        "64",
        "--output",
        "4",
        "--w-bits",
        "4",
        "--plot",
        str(png),
    )
    assert "q_proj" in out and "total:" in out and "W4A16KV16" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_phase_needs_its_lengths(capsys):
    with pytest.raises(EffLLMError, match="--output"):
        run(
            capsys,
            "roofline",
            "--model",
            "llama-7b",
            "--hardware",
            "a100-80g",
            "--phase",
            "generate",
            "--prompt",
            "64",
        )
    with pytest.raises(EffLLMError, match="--context"):
        run(capsys, "roofline", "--model", "llama-7b", "--hardware", "a100-80g", "--phase", "decode")


def test_memory_inference_and_training(capsys):
    argv = ["memory", "--model", "llama-7b", "--batch", "16", "--context", "4000", "--hardware", "rtx4090"]
    data = json.loads(run(capsys, *argv, "--json"))
    assert data["weights"] == pytest.approx(6.74e9 * 2, rel=0.01)
    assert data["kv_cache"] == 16 * 4000 * 2 * 32 * 4096 * 2
    assert data["fits"] is False
    int4 = json.loads(run(capsys, *argv, "--kv-cache-dtype", "int4", "--json"))
    assert int4["kv_cache"] == data["kv_cache"] * (4 + 32 / 128) / 16  # codes plus a float16 step and minimum
    out = run(
        capsys,
        "memory",
        "--model",
        "galore-60m",
        "--mode",
        "training",
        "--optimizer",
        "galore_adamw",
        "--rank",
        "128",
        "--seq-len",
        "256",
        "--state-bits",
        "8",
    )
    assert "optimizer state" in out and "total" in out


def test_runtime_fit_predict_and_export(capsys, tmp_path):
    runs = [
        {"prompt_tokens": p, "output_tokens": o, "runtime_s": 0.01 * p / 16 + 0.02 * (o - 1)}
        for p in (16, 64)
        for o in (1, 5, 9)
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    out_file = tmp_path / "model.json"
    data = json.loads(
        run(
            capsys,
            "runtime",
            "--runs",
            str(tmp_path / "runs.json"),
            "--out",
            str(out_file),
            "--predict",
            "64",
            "3",
            "--json",
        )
    )
    assert data["model"]["runtime_per_output_token"] == pytest.approx(0.02)
    assert data["predictions"][0]["runtime_s"] == pytest.approx(0.04 + 0.04)
    again = json.loads(run(capsys, "runtime", "--fitted", str(out_file), "--predict", "64", "3", "--json"))
    assert again["predictions"] == data["predictions"]


def test_hardware_list_and_measure(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_HARDWARE_FILE", str(tmp_path / "hw.json"))
    listed = json.loads(run(capsys, "hardware", "--list", "--json"))
    assert "h200" in listed and "local" not in listed
    run(capsys, "hardware", "--copy-mib", "1", "--matmul-n", "32", "--repeats", "1")
    assert "local" in json.loads(run(capsys, "hardware", "--list", "--json"))


def test_roofline_sparsity_flag(capsys, config_only_folder):
    argv = ["roofline", "--model", str(config_only_folder), "--hardware", "a100", "--phase", "decode"]
    dense = json.loads(run(capsys, *argv, "--context", "64", "--json"))
    sparse = json.loads(run(capsys, *argv, "--context", "64", "--sparsity", "2:4", "--json"))
    assert sparse["sparsity"] == "2:4" and sparse["total"]["bytes"] < dense["total"]["bytes"]
    assert "2:4 sparse linears" in run(capsys, *argv, "--context", "64", "--sparsity", "2:4")
    with pytest.raises(EffLLMError, match="N:M"):
        run(capsys, *argv, "--context", "64", "--sparsity", "half")
