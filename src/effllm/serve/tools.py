"""Tool calling for `/v1/chat/completions`: what the model is shown, what constrains it, and how its
output becomes OpenAI's `tool_calls`.

By `tool_choice` (OpenAI's default: `auto` when tools are given):
- `none`: the tools are not shown; plain text.
- a named function: the output is constrained to that function's `parameters` schema and returned as one
  call of it (finish_reason "stop", as OpenAI does for a forced call).
- `required`: the output is constrained to a JSON array of `{"name": ..., "parameters": {...}}`, one of
  the tools each (vLLM's schema); each item is a call (finish_reason "tool_calls").
- `auto`: the output is free; calls are read from it in the documented format below, and text outside
  them is the message's content (finish_reason "tool_calls" when there are calls).

The auto format (Hermes', which Qwen2.5 and others are trained on):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Bath"}}
    </tool_call>

The tools reach the model through the chat template's `tools` variable. A template that never reads
`tools` (the default model's, for instance) gets them instead in a system message that lists their
schemas and this format.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from effllm.serve.protocol import ChatCompletionRequest, FunctionCallOut, NamedToolChoice, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parameters(tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (OpenAI's shape), or None when the model may not call any."""
    if not req.uses_tools:
        return None
    return [tool.model_dump(exclude_none=True, by_alias=True) for tool in req.tools]


def tools_system_message(tools: list[dict[str, Any]]) -> dict[str, str]:
    """The tools and the call format as a system message, for templates that do not render `tools`."""
    listing = "\n".join(json.dumps(t["function"]) for t in tools)
    return {
        "role": "system",
        "content": "You may call these functions:\n"
        f"{listing}\n"
        "To call one, answer with\n"
        f'{OPEN}\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{CLOSE}',
    }


def tool_constraint(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The structured-output constraint a tool choice implies (named or required), else None."""
    choice = req.effective_tool_choice
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in req.tools if t.function.name == choice.function.name)
        return {"json_schema": parameters(tool)}
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": parameters(t),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in req.tools
        ]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {"type": "array", "minItems": 1, "items": items}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return {"json_schema": schema}
    return None


def call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=new_call_id(), function=FunctionCallOut(name=name, arguments=text))


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a `required` output (a JSON array the constraint made valid; [] if it was cut off)."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    return [call(item["name"], item["parameters"]) for item in items]


def parse_auto(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of free text: each well-formed `<tool_call>` block naming a known function is a
    call and leaves the content; anything else stays in the content."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        parsed = _parse_call(match.group(1), names)
        if parsed is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(parsed)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _parse_call(body: str, names: set[str]) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return call(data["name"], arguments)


class AutoToolStream:
    """Streams `auto` output: text goes out as content until a `<tool_call>` begins (a possible start of
    one is held back), the rest is held until the end and then parsed by `parse_auto`."""

    def __init__(self, names: set[str]):
        self.names = names
        self.text = ""
        self.sent = 0  # characters of `text` sent as content
        self.calling = False

    def feed(self, delta: str) -> str:
        """Content that can go out now."""
        self.text += delta
        if self.calling:
            return ""
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            self.calling = True
            return self._send(start)
        hold = _partial_suffix(self.text, OPEN)
        return self._send(len(self.text) - hold)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls) at the end of the output."""
        tail = self.text[self.sent :]
        self.sent = len(self.text)
        content, calls = parse_auto(tail, self.names)
        return (content or "", calls) if calls else (tail, [])

    def _send(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (so it might become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
