"""Rendering chat templates exactly as Hugging Face transformers does.

A chat template is Jinja code shipped with a checkpoint, so it is untrusted: it runs in Jinja's immutable
sandbox. The environment matches transformers' (`utils/chat_template_utils.py`): `trim_blocks`,
`lstrip_blocks`, the loop-controls extension, a no-op `{% generation %}` tag, the `raise_exception` and
`strftime_now` globals, a `tojson` that neither escapes HTML nor forces ASCII, and `dict`/`namespace` that
cannot reach Python internals. The inputs go through the same normalisation, so a template renders the
same string byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from effllm.core.errors import InputError, TokenizerError

# Names a message's reasoning comes under; templates read the first, gpt-oss templates read `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat_template(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tools: Sequence[Mapping] | None = None,
    documents: Sequence[Mapping] | None = None,
    **variables: Any,
) -> str:
    """Render `messages` (dicts, dataclasses or pydantic models) as transformers' `apply_chat_template`.

    `variables` are extra template variables: the special tokens (`bos_token`, ...) and options such as
    `enable_thinking`. With `continue_final_message` the text ends inside the last message, so the model
    continues it instead of starting a new one.
    """
    if continue_final_message and add_generation_prompt:
        raise InputError("continue_final_message and add_generation_prompt exclude each other; pass one")
    chat = _alias_reasoning_fields(_plain(_normalize_messages(messages)))
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise InputError("tools must be JSON schemas (dicts); convert functions to schemas first")
    if documents is not None and not all(isinstance(doc, Mapping) for doc in documents):
        raise InputError("documents must be dicts with 'title' and 'text' keys")
    final = _tag_final_message(chat, template) if continue_final_message else None
    compiled = compile_chat_template(template)
    try:
        text = compiled.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except jinja2.TemplateError as e:
        raise InputError(f"the chat template rejected the messages: {e}") from None
    return text if final is None else _cut_at_tag(text, final)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a template once; checkpoints reuse the same few."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix or replace it"
        ) from None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own filter escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the class itself (whose attributes lead out of the sandbox)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore attributes that could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature, so `self` can be an attribute name
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes ({name!r})"
            )


def _normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages as dicts without the keys whose value is None (OpenAI clients send `content=None`)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    normalized = []
    for message in messages:
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        elif dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = {field.name: getattr(message, field.name) for field in dataclasses.fields(message)}
        if not isinstance(message, Mapping):
            raise InputError(f"each chat message must be a dict with 'role' and 'content', got {message!r}")
        normalized.append({key: value for key, value in message.items() if value is not None})
    return normalized


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types, so the template sees no object with unsafe methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    """Copy a message's reasoning under `reasoning_content` and `thinking`, whichever name it came under."""
    aliased = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _tag_final_message(chat: list[dict], template: str) -> str:
    """Mark the end of the last message's text, so the rendered chat can be cut there; returns that text."""
    content = chat[-1].get("content")
    if content is None or "content" not in template:
        raise InputError(
            "continue_final_message needs a final message with content that the template renders"
        )
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return content
    for block in reversed(content):
        if isinstance(block, dict) and "text" in block:
            text = block["text"]
            block["text"] = text + _CONTINUE_TAG
            return text
    raise InputError("continue_final_message is set but the final message has no text to continue")


def _cut_at_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise InputError(
            "continue_final_message is set but the chat template drops part of the final message"
        )
    at = text.rindex(tag)
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space, so trim ours too
