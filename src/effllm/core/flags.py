"""Command-line flags built from config dataclasses: a flag is a field, its help is the field's metadata.

    @dataclass
    class EngineConfig:
        block_size: int = option(16, "tokens per KV-cache block")

    add_dataclass_flags(parser, EngineConfig)        # --block-size N
    config = EngineConfig(**given_fields(args, EngineConfig))

Types map to argparse as vLLM's `arg_utils` does: `bool` becomes `--x/--no-x`, `X | None` an optional X,
`list[...]` takes several values, `dict[...]` takes KEY=VALUE pairs (read by the caller), `choices` in the
metadata limit a value. Flags that are not given are absent from the namespace (argparse.SUPPRESS), so
the dataclass (or a YAML file, for training) supplies the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

import yaml

from effllm.core.errors import ConfigError

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def option(
    default: Any, help: str, choices: tuple[Any, ...] | None = None, metavar: str | None = None
) -> Any:
    """A dataclass field whose metadata carries the flag's help text (and choices)."""
    metadata = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def strip_optional(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _scalar_type(hint: Any) -> Any:
    """The argparse `type` of a scalar field; anything else (a union such as `int | str`) reads as a string."""
    return hint if hint in (int, float, str) else str


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field of `cls` (except `exclude`); `defaults` overrides the defaults shown in --help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if "help" not in f.metadata:
            raise TypeError(
                f"{cls.__name__}.{f.name} has no help text: declare it with effllm.core.flags.option"
            )
        default = (defaults or {}).get(f.name, _default(f))
        help_text = f.metadata["help"]
        if default not in (None, [], {}):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        hint = strip_optional(hints[f.name])
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(nargs="+", metavar=f.metadata.get("metavar") or "VALUE")
        elif origin is dict:
            kwargs.update(nargs="+", metavar=f.metadata.get("metavar") or "KEY=VALUE")
        else:
            kwargs["type"] = _scalar_type(hint)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag_name(f.name), **kwargs)


def given_fields(args: argparse.Namespace, cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` that were given as flags (absent flags are left to the dataclass defaults);
    `exclude` names fields whose flag the command uses for something else, as in `add_dataclass_flags`."""
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: v for k, v in vars(args).items() if k in names}


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """['rank=128', 'betas=[0.9,0.95]'] -> {'rank': 128, 'betas': [0.9, 0.95]} (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE pairs, got {item!r}")
        try:
            out[key.replace("-", "_")] = numbers_in(yaml.safe_load(value))
        except yaml.YAMLError:
            out[key.replace("-", "_")] = value
    return out


def numbers_in(value: Any) -> Any:
    """YAML 1.1 reads '1e-7' as a string; make such strings numbers (in lists and mappings too)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [numbers_in(v) for v in value]
    if isinstance(value, dict):
        return {k: numbers_in(v) for k, v in value.items()}
    return value
