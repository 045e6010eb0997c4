"""`effllm train`: pretrain or fine-tune a model, on one process or under torchrun.

Every flag is a field of `effllm.train.TrainConfig`; `--config FILE.yaml` takes the same names (dashes or
underscores) and flags given on the command line win over it. Under torchrun the same command trains
with DDP or FSDP2: `torchrun --nproc-per-node 2 -m effllm.train --model M --data D --out O`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from effllm.cli.errors import run_command

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
    sub = p.add_subparsers(dest="train_command", metavar="{grow}", required=False)
    g = sub.add_parser(
        "grow",
        help="G_stack: grow a trained model in depth by stacking its layers (then train on with --model)",
        description="Layer i of the grown model copies layer i mod L of the source (the whole stack "
        "--factor times); embedding, final norm and head are copied. Continue with effllm train --model OUT.",
        argument_default=None,
    )
    g.add_argument("--from", dest="source", required=True, help="the trained model to grow")
    g.add_argument(
        "--factor", type=int, default=4, help="how many times the stack repeats (default 4, the paper's)"
    )
    g.add_argument("--out", required=True, help="folder of the grown model")
    g.set_defaults(func=run_grow)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (given flags only: absent ones fall back to --config, then defaults)."""
    from effllm.core.flags import add_dataclass_flags
    from effllm.train.config import TrainConfig

    parser.add_argument(
        "--config", help="YAML file of options, named as the flags", default=argparse.SUPPRESS
    )
    add_dataclass_flags(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags (and the --config file) describe."""
    from effllm.core.flags import given_fields, parse_key_values
    from effllm.train.config import TrainConfig

    given = given_fields(args, TrainConfig)
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


def run_grow(args: argparse.Namespace) -> int:
    from effllm.models import load_model, load_tokenizer, save_model
    from effllm.models.hub import resolve_model_path
    from effllm.train.growth import stack

    model = load_model(args.source, device="cpu")
    grown = stack(model, factor=args.factor)
    folder = resolve_model_path(args.source)
    tokenizer = load_tokenizer(args.source) if (folder / "tokenizer.json").is_file() else None
    save_model(grown, args.out, tokenizer=tokenizer)
    params = sum(p.numel() for p in grown.parameters())
    print(
        f"grew {args.source} from {model.config.num_hidden_layers} to {grown.config.num_hidden_layers} layers "
        f"({params:,} parameters): wrote {args.out}; continue with effllm train --model {args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m effllm.train`: `effllm train` without the rest of the CLI (what torchrun runs)."""
    parser = argparse.ArgumentParser(
        prog="python -m effllm.train",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(run, args)
