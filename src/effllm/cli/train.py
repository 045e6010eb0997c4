"""`effllm train`: pretrain or fine-tune a model, on one process or under torchrun.

Every flag is a field of `effllm.train.TrainConfig`; `--config FILE.yaml` takes the same names (dashes or
underscores) and flags given on the command line win over it. Under torchrun the same command trains
with DDP or FSDP2: `torchrun --nproc-per-node 2 -m effllm.train --model M --data D --out O`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import TYPE_CHECKING

from effllm.core.errors import EffLLMError

if TYPE_CHECKING:
    from effllm.train.config import TrainConfig

EXAMPLES = """examples:
  effllm tokenizer train --data corpus/ --vocab-size 8000 --out tok
  effllm train --model-config config.json --tokenizer tok --data corpus/ --out run --steps 2000 --seq-len 256
  effllm train --model run --data chats.jsonl --out sft --lr 2e-5 --steps 500 --save-every 100
  effllm train --config run.yaml --resume
  torchrun --nproc-per-node 4 -m effllm.train --config run.yaml --parallel fsdp
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="pretrain or fine-tune a model (resumable; DDP/FSDP2 under torchrun)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add_train_arguments(p)
    p.set_defaults(func=run)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (given flags only: absent ones fall back to --config, then defaults)."""
    from effllm.train.config import TrainConfig

    parser.add_argument("--config", help="YAML file of options, named as the flags", default=argparse.SUPPRESS)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata["help"] + ("" if default in (None, [], {}) else f" (default: {default})")
        kwargs: dict[str, typing.Any] = {"help": help_text, "default": argparse.SUPPRESS}
        hint = _strip_optional(hints[f.name])
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(nargs="+", metavar="PATH")
        elif origin is dict:
            kwargs.update(nargs="+", metavar="KEY=VALUE")
        else:
            kwargs["type"] = hint
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags (and the --config file) describe."""
    from effllm.train.config import TrainConfig, parse_key_values

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    for key in ("optimizer_options", "method_options"):
        if key in given:
            given[key] = parse_key_values(given[key], "--" + key.replace("_", "-"))
    config_file = getattr(args, "config", None)
    if config_file:
        return TrainConfig.from_yaml(config_file, given)
    return TrainConfig.from_dict(given, source="flags")


def run(args: argparse.Namespace) -> int:
    from effllm.train.distributed import shutdown_distributed
    from effllm.train.trainer import Trainer

    config = config_from_args(args)
    try:
        Trainer(config).train()
    finally:
        shutdown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m effllm.train`: `effllm train` without the rest of the CLI (what torchrun runs)."""
    parser = argparse.ArgumentParser(prog="python -m effllm.train", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except EffLLMError as e:
        print(f"effllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effllm: interrupted", file=sys.stderr)
        return 130


def _strip_optional(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint
