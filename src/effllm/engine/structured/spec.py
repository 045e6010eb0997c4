"""`StructuredOutputs`: the one constraint a request's output must satisfy.

    SamplingParams(structured=StructuredOutputs(json_schema={"type": "object", ...}))
    SamplingParams(structured={"regex": r"\\d{3}-\\d{4}"})        # a dict is read as the same fields
    SamplingParams(structured={"choice": ["yes", "no"]})

Exactly one kind per request (vLLM's and OpenAI's rule): `json_schema` (a JSON Schema as a dict or JSON
text), `json_object` (any JSON object, OpenAI's `response_format: json_object`), `regex`, `grammar` (EBNF
in xgrammar's GBNF dialect when it holds `::=`, else Lark) or `choice` (the output is one of the
strings), or, from Python, `constraint`: a `Constraint` object of one's own (SELP's plan automaton is
one). `any_whitespace` lets JSON put any whitespace between tokens; off by default, because a model
that is unsure loops on whitespace (it is valid JSON either way). `key()` identifies the compiled grammar
the request needs, so equal specs compile once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from effllm.core.errors import InputError
from effllm.engine.structured.grammar import Constraint

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice", "constraint")


@dataclass(frozen=True)
class StructuredOutputs:
    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None
    constraint: Constraint | None = None
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise InputError(f"choice must be a list of strings, got {self.choice!r}")
            if not self.choice or not all(self.choice):
                raise InputError("choice needs at least one string, and no empty ones")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json_schema, str):
            try:
                object.__setattr__(self, "json_schema", json.loads(self.json_schema))
            except json.JSONDecodeError as e:
                raise InputError(f"json_schema is not valid JSON ({e.msg} at character {e.pos})") from None
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise InputError(f"json_schema must be a JSON object, got {type(self.json_schema).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InputError(f"{name} must be a non-empty string, got {value!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise InputError(f"constraint must be a Constraint, not {type(self.constraint).__name__}")
        if not isinstance(self.json_object, bool) or not isinstance(self.any_whitespace, bool):
            raise InputError("json_object and any_whitespace must be true or false")
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InputError(
                f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )

    @classmethod
    def of(cls, value: StructuredOutputs | dict[str, Any] | None) -> StructuredOutputs | None:
        """A spec from itself, None, or a dict of its fields (unknown keys are refused by name)."""
        if value is None or isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, dict):
            raise InputError(f"structured must be a StructuredOutputs or a dict, not {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InputError(
                f"structured outputs have no field {unknown[0]!r}; use one of {', '.join(KINDS)}"
            )
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar: kind, canonical spec text, whitespace flag."""
        value = getattr(self, self.kind)
        if self.kind == "constraint":
            return self.kind, f"{type(value).__qualname__}:{value.key()}", False
        text = json.dumps(value, sort_keys=True) if self.kind in ("json_schema", "choice") else str(value)
        return self.kind, text, self.any_whitespace
