"""One flag builder: every config field is a flag with its help text, spelled the same on every command."""

import argparse
import dataclasses

import pytest

from effllm.cli import build_parser
from effllm.core.flags import add_dataclass_flags, given_fields, option
from effllm.engine.config import EngineConfig
from effllm.train.config import TrainConfig

ENGINE_COMMANDS = [
    ["generate"],
    ["serve"],
    ["bench", "throughput"],
    ["bench", "latency"],
    ["bench", "generate"],
]
# Fields a command spells differently on purpose: generate's --seed is the request's, a bench's --dtype the model's.
OWN_MEANING = {
    ("generate",): {"seed"},
    ("bench", "throughput"): {"dtype"},
    ("bench", "latency"): {"dtype"},
    ("bench", "generate"): {"dtype"},
}


def subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def engine_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


@pytest.mark.parametrize("path", ENGINE_COMMANDS, ids=" ".join)
def test_every_engine_field_is_a_flag_with_its_help(path):
    actions = engine_flags(subparser(path))
    for f in dataclasses.fields(EngineConfig):
        if f.name in OWN_MEANING.get(tuple(path), ()):
            continue
        action = actions[f.name]
        assert "--" + f.name.replace("_", "-") in action.option_strings
        assert action.help.startswith(f.metadata["help"]), f.name


def test_engine_flags_parse_to_the_config_fields():
    args = subparser(["serve"]).parse_args(
        [
            "--no-enable-prefix-caching",
            "--max-num-seqs",
            "4",
            "--kv-cache-memory",
            "1GiB",
            "--attention-backend",
            "paged",
        ]
    )
    options = given_fields(args, EngineConfig)
    assert options == {
        "enable_prefix_caching": False,
        "max_num_seqs": 4,
        "kv_cache_memory": "1GiB",
        "attention_backend": "paged",
    }
    assert EngineConfig(**options).max_num_seqs == 4


def test_the_old_duplicate_prefix_caching_spelling_is_gone():
    for path in ENGINE_COMMANDS:
        with pytest.raises(SystemExit):
            subparser(path).parse_args(["--no-prefix-caching"])


def test_every_train_field_is_a_flag_with_its_help():
    actions = engine_flags(subparser(["train"]))
    for f in dataclasses.fields(TrainConfig):
        assert actions[f.name].help.startswith(f.metadata["help"])


@dataclasses.dataclass
class Toy:
    flag: bool = option(True, "a switch")
    count: int | None = option(None, "how many")
    names: list[str] = option([], "some names")
    pairs: dict[str, int] = option({}, "a mapping")
    mode: str = option("a", "a choice", choices=("a", "b"))


def test_field_types_map_to_argparse_kinds():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Toy)
    args = parser.parse_args(
        ["--no-flag", "--count", "3", "--names", "x", "y", "--pairs", "k=1", "--mode", "b"]
    )
    assert given_fields(args, Toy) == {
        "flag": False,
        "count": 3,
        "names": ["x", "y"],
        "pairs": ["k=1"],
        "mode": "b",
    }
    assert given_fields(parser.parse_args([]), Toy) == {}  # absent flags leave the defaults to the dataclass
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass
    class Bare:
        x: int = 1

    with pytest.raises(TypeError, match="no help text"):
        add_dataclass_flags(argparse.ArgumentParser(), Bare)
