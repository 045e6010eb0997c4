"""Records to token ids, with the mask of tokens the loss is taken on.

A document becomes [BOS when the tokenizer adds one] + its ids + [EOS], so packed documents stay apart.
A conversation is rendered with the tokenizer's chat template one message at a time; only assistant
messages (their content and end-of-turn, not the role header the generation prompt writes) count.
"""

from __future__ import annotations

from typing import Any

from effllm.core.errors import ConfigError
from effllm.train.sources import Record


class RecordEncoder:
    """Encodes `Record`s with a `effllm.models.tokenizer.Tokenizer`."""

    def __init__(self, tokenizer: Any):
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token; packing needs one to separate documents")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
        self.bos = bos if adds_bos else None

    def encode(self, record: Record) -> tuple[list[int], list[int] | None]:
        """(token ids, loss mask or None when every token counts)."""
        if record.messages is not None:
            return self.encode_chat(record.messages)
        ids = self.tokenizer.encode(record.text, add_special_tokens=False)
        if record.start and self.bos is not None:
            ids.insert(0, self.bos)
        if record.end:
            ids.append(self.eos)
        return ids, None

    def encode_chat(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Ids of the rendered conversation and a mask that is 1 exactly on assistant-written tokens."""
        ids: list[int] = []
        mask: list[int] = []
        rendered = ""

        def extend(text: str, target: int) -> None:
            if not text.startswith(rendered):
                raise ConfigError(
                    "the chat template renders a conversation's prefix differently from the whole "
                    "(it rewrites earlier turns); supervised fine-tuning needs a template that only appends"
                )
            piece = self.tokenizer.encode(text[len(rendered) :], add_special_tokens=False)
            ids.extend(piece)
            mask.extend([target] * len(piece))

        template = self.tokenizer.apply_chat_template
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i > 0:
                prompt = template(messages[:i], add_generation_prompt=True, tokenize=False)
                extend(prompt, 0)
                rendered = prompt
            full = template(messages[: i + 1], tokenize=False)
            extend(full, int(message["role"] == "assistant"))
            rendered = full
        return ids, mask
