"""Bad input is a one-line error (exit code 2) before any training starts."""

import argparse
import dataclasses
import json

import pytest

from effllm.cli.train import add_train_arguments, config_from_args, main
from effllm.core.errors import ConfigError
from effllm.train.config import TrainConfig
from effllm.train.methods import METHODS, get_method


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


def saved_run(argv, capsys) -> list[str]:
    args = argv("--save-every", "1")
    assert main(args) == 0
    capsys.readouterr()
    return args


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (["--lr", "0.5"], "--lr was 0.0003, now 0.5"),
        (["--seq-len", "16"], "--seq-len was 32, now 16"),
        (["--optimizer", "sgd"], "--optimizer was 'adamw', now 'sgd'"),
        (["--optimizer-options", "betas=[0.8,0.9]"], "--optimizer-options"),
        (["--seed", "3"], "--seed was 0, now 3"),
    ],
)
def test_resume_that_changes_the_run_is_refused_naming_old_and_new(argv, capsys, tmp_path, change, field):
    saved_run(argv, capsys)
    assert main([*argv("--resume", "--steps", "3"), *change]) == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err and field in err and err.count("\n") == 1, err


def test_resume_with_a_different_model_is_refused(argv, capsys, tmp_path, assets):
    saved_run(argv, capsys)
    other = json.loads((assets / "config.json").read_text())
    other["hidden_size"] = 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    args = argv("--resume", "--steps", "3")
    args[args.index("--model-config") + 1] = str(tmp_path / "other.json")
    assert main(args) == 2
    assert "--model-config was" in capsys.readouterr().err


def test_resume_may_change_steps_and_logging(argv, capsys, tmp_path):
    saved_run(argv, capsys)
    assert main(argv("--resume", "--steps", "3", "--log-every", "5", "--save-every", "2")) == 0


def test_a_corrupt_newest_state_falls_back_to_the_checkpoint_before_it(argv, capsys, tmp_path):
    saved_run(argv, capsys)
    newest = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    (newest / "trainer_state.json").write_text("{not json")
    assert main(argv("--resume", "--steps", "3")) == 0
    out = capsys.readouterr()
    assert "skipping it and resuming from the newest checkpoint before it" in out.out + out.err
    assert "resuming from" in out.out + out.err and "step-00000001" in out.out + out.err


def test_a_checkpoint_without_its_optimizer_state_says_what_is_missing(argv, capsys, tmp_path):
    saved_run(argv, capsys)
    newest = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    (newest / "optimizer.pt").unlink()
    assert main(argv("--resume", "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert "lacks optimizer.pt" in err and "FSDP" not in err


def test_out_under_a_regular_file_is_one_line(argv, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    args = argv()
    args[args.index("--out") + 1] = str(tmp_path / "file" / "run")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is a file; pass a folder" in err and err.count("\n") == 1


def test_method_help_names_every_registered_method_and_unknown_ones_are_refused():
    help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "method").metadata["help"]
    assert all(name in help_text for name in METHODS)
    with pytest.raises(ConfigError, match="unknown training method 'nope'; choose one of: dkm"):
        get_method("nope")
