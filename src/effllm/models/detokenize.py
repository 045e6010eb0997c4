"""Streaming detokenization: the text each new token adds, without broken characters or lost spaces.

Decoding a token alone is wrong in two ways: a token can hold part of a UTF-8 character (byte-level BPE,
SentencePiece byte fallback), and a decoder drops the leading space of the first token it sees (Metaspace,
"▁word"). So, as vLLM and transformers' TextStreamer do, we decode a short window of already emitted tokens
plus the new ones and emit what the new ones added; while the text ends in U+FFFD, a character is still
incomplete and we hold it back. The window restarts at each emission, so each step decodes a few tokens.

SentencePiece's byte fallback decodes a run of <0xNN> tokens as one unit, and a run holding any invalid
byte becomes all U+FFFD, characters already complete included. So we also hold text while the window
ends in a byte token: emitted text never changes after the fact, and the deltas add up to `decode` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effllm.models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids, fed one at a time, into text deltas whose concatenation is `decode(ids)`.

    `prompt_ids` give the first generated token its context (its leading space). Call `flush` after the
    last token to get any text held back (an incomplete character at the very end).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
        context: int = 5,
    ) -> None:
        self._backend = tokenizer.backend
        # Skipped tokens never enter the window: a decoder must see the same neighbours as in a full decode.
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_token_ids
        self._window = [i for i in prompt_ids if i not in self._skip][-context:]  # emitted, then pending ids
        self._emitted = len(self._window)  # how many ids at the start of the window are emitted
        self._emitted_text = self._decode(self._window)

    def add(self, token_id: int) -> str:
        """The text `token_id` completes; empty while a character is still incomplete."""
        if token_id in self._skip:
            return ""
        self._window.append(token_id)
        if token_id in self._byte_ids:
            return ""
        text = self._decode(self._window)
        if len(text) <= len(self._emitted_text) or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text still held back, emitted as is; call it once generation ends."""
        text = self._decode(self._window)
        return self._advance(text) if len(text) > len(self._emitted_text) else ""

    def _advance(self, text: str) -> str:
        delta = text[len(self._emitted_text) :]
        # The pending ids become the new window's context, so the window stays a few tokens long.
        del self._window[: self._emitted]
        self._emitted = len(self._window)
        self._emitted_text = self._decode(self._window)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)
