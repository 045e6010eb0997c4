"""The interface a constraint implements, and the token bitmask it fills.

A `Grammar` is one request's matcher state. Each step the engine asks it to `fill` the row of a bitmask
with the tokens allowed next (int32 words, bit i of word w allows token 32 w + i, xgrammar's layout); when
the request drafts (speculative decoding), it fills one row per position by `accept`ing each draft in
turn and then `rollback`s them, so its state is unchanged until the verified tokens are `accept`ed for
good. The sampler sets every disallowed logit to -inf before penalties and temperature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

ALL_ALLOWED = -1  # an int32 word with every bit set


class Grammar(ABC):
    @abstractmethod
    def accept(self, token: int) -> bool:
        """Advance over `token`; False (and no change) when the grammar does not allow it here."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""

    @abstractmethod
    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row] (int32 [rows, words])."""

    @property
    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether an end token was accepted (the output is complete)."""


class Constraint(ABC):
    """A constraint defined in Python (`StructuredOutputs(constraint=...)`, e.g. SELP's plan automaton):
    compiled once per distinct `key()` for a model's tokenizer, then one `matcher` per request."""

    @abstractmethod
    def key(self) -> str:
        """What identifies the compiled form (equal keys share it)."""

    @abstractmethod
    def compile(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
        """Whatever the matchers need, built from the tokenizer (runs once per key)."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Grammar:
        """A fresh matcher for one request."""


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """int32 [rows, ceil(vocab / 32)], every token allowed."""
    return torch.full((rows, bitmask_words(vocab_size)), ALL_ALLOWED, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab]: the bitmask unpacked (tokens past `vocab_size` dropped)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def set_tokens(bitmask: torch.Tensor, row: int, tokens: list[int] | set[int]) -> None:
    """bitmask[row] allows exactly `tokens`."""
    words = [0] * bitmask.shape[1]
    for t in tokens:
        words[t >> 5] |= 1 << (t & 31)
    # int32 words: bit 31 makes a word negative
    bitmask[row] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] with every token the bitmask disallows at -inf (in place; returned)."""
    allowed = allowed_tokens(bitmask.to(logits.device), logits.shape[-1])
    return logits.masked_fill_(~allowed, float("-inf"))
