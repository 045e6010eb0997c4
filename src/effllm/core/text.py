"""Text that enters EffLLM must be valid Unicode: a lone UTF-16 surrogate (JSON's "\\ud800", a non-UTF-8 byte
in argv, which Python keeps as "\\udcXX") cannot be tokenized or written back as UTF-8."""

from __future__ import annotations

import re
from typing import Any

from effllm.core.errors import InputError

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str) -> str:
    """`text` itself, or InputError naming `what` and where the invalid character is."""
    match = _SURROGATE.search(text)
    if match is not None:
        raise InputError(
            f"{what} is not valid Unicode (a lone surrogate U+{ord(match.group()):04X} at character "
            f"{match.start()}); send UTF-8 text"
        )
    return text


def invalid_text_path(value: Any, path: str = "") -> str | None:
    """The dotted path (`messages.0.content`) of the first string (or key) of a decoded JSON value that is
    not valid Unicode, or None when every one is."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    return where
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}" if where else str(i)) for i, child in enumerate(item))
    return None
