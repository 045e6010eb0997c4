"""Bad input is a one-line error (exit code 2) before any training starts."""

import argparse
import json

import pytest

from effllm.cli.train import add_train_arguments, config_from_args, main


@pytest.fixture
def argv(assets, tmp_path):
    def make(*extra: str, data: str | None = None) -> list[str]:
        return [
            "--model-config",
            str(assets / "config.json"),
            "--tokenizer",
            str(assets / "tok"),
            "--data",
            data or str(assets / "corpus.txt"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--no-tensorboard",
            *extra,
        ]

    return make


def fails(args, capsys, tmp_path, message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("effllm: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_file(argv, capsys, tmp_path):
    fails(argv(data=str(tmp_path / "nope.txt")), capsys, tmp_path, "does not exist")


def test_empty_data(argv, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    fails(argv(data=str(tmp_path / "empty.txt")), capsys, tmp_path, "holds no text")
    assert main(argv()) == 0  # the failed run left only its token cache in --out, which is no obstacle


def test_resume_into_a_folder_that_is_not_a_run(argv, capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"not ours")
    fails(argv("--resume"), capsys, tmp_path, "no training run to resume")


def test_data_shorter_than_one_sequence(argv, capsys, tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    fails(argv(data=str(tmp_path / "short.txt")), capsys, tmp_path, "fewer than one training sequence")


def test_chat_data_without_assistant_turns(argv, capsys, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hello " * 20}]}) + "\n")
    fails(argv(data=str(chats)), capsys, tmp_path, "no assistant messages")


def test_sequence_length_over_the_models_maximum(argv, capsys, tmp_path):
    fails(argv("--seq-len", "65"), capsys, tmp_path, "exceeds the model's maximum sequence length")


def test_unknown_optimizer(argv, capsys, tmp_path):
    fails(argv("--optimizer", "adamm"), capsys, tmp_path, "unknown optimizer 'adamm'")


def test_unknown_optimizer_option(argv, capsys, tmp_path):
    fails(argv("--optimizer-options", "momentun=0.9"), capsys, tmp_path, "momentun")


def test_out_holding_another_run_without_resume(argv, capsys, tmp_path):
    assert main(argv()) == 0
    capsys.readouterr()
    rows_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(argv()) == 2
    err = capsys.readouterr().err
    assert "already holds a training run; pass --resume" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows_before


def test_new_model_without_tokenizer(assets, capsys, tmp_path):
    args = [
        "--model-config",
        str(assets / "config.json"),
        "--data",
        str(assets / "corpus.txt"),
        "--out",
        str(tmp_path / "run"),
    ]
    fails(args, capsys, tmp_path, "--model-config needs --tokenizer")


def test_unknown_option_in_the_yaml_file(argv, capsys, tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 3\nlearning-rate: 0.1\n")
    fails(argv("--config", str(tmp_path / "run.yaml")), capsys, tmp_path, "unknown option 'learning-rate'")


def test_yaml_options_take_the_flag_names_and_flags_win(argv, tmp_path):
    (tmp_path / "run.yaml").write_text(
        "seq-len: 16\nwarmup_steps: 3\nlr: 3e-4\noptimizer-options: {betas: [0.8, 0.9]}\n"
    )
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_train_arguments(parser)
    args = parser.parse_args(
        argv("--config", str(tmp_path / "run.yaml"), "--seq-len", "24", "--optimizer-options", "eps=1e-7")
    )
    config = config_from_args(args)
    assert (config.seq_len, config.warmup_steps, config.lr) == (24, 3, 3e-4)
    assert config.optimizer_options == {"betas": [0.8, 0.9], "eps": 1e-7}


def test_dropout_out_of_range(argv, capsys, tmp_path):
    fails(argv("--dropout", "1.0"), capsys, tmp_path, "--dropout must be in [0, 1)")


def test_dropout_with_a_zeroth_order_optimizer(argv, capsys, tmp_path):
    fails(argv("--dropout", "0.1", "--optimizer", "zo_sgd"), capsys, tmp_path, "use --dropout 0")
