"""A token trie over a fixed set of strings, and `ChoiceGrammar`: the output is one of them.

Each string is tokenized once (without special tokens) and its ids become a path of the trie; the
output follows one path and then an end token. This is the built-in backend (no native dependency):
`choice` constraints use it whatever the backend, and SELP's plan decoding walks the same trie.
Only each string's own tokenization is allowed, not every other spelling in tokens of the same text.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from effllm.engine.structured.grammar import Grammar, set_tokens


class TokenTrie:
    """Nodes are ints; node 0 is the root. `children[node]` maps a token to the next node, and
    `ends[node]` is the index of the string that ends there (or None)."""

    def __init__(self, sequences: Iterable[list[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.ends: list[int | None] = [None]
        for index, ids in enumerate(sequences):
            node = 0
            for token in ids:
                nxt = self.children[node].get(token)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][token] = nxt
                    self.children.append({})
                    self.ends.append(None)
                node = nxt
            if self.ends[node] is None:
                self.ends[node] = index


class ChoiceGrammar(Grammar):
    """One of `trie`'s strings, then one of `end_tokens`."""

    def __init__(self, trie: TokenTrie, end_tokens: Iterable[int]):
        self.trie = trie
        self.end_tokens = frozenset(end_tokens)
        self.path = [0]  # nodes visited; -1 after an end token

    def accept(self, token: int) -> bool:
        node = self.path[-1]
        if node < 0:
            return False
        if token in self.end_tokens and self.trie.ends[node] is not None:
            self.path.append(-1)
            return True
        nxt = self.trie.children[node].get(token)
        if nxt is None:
            return False
        self.path.append(nxt)
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            del self.path[-num_tokens:]

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        node = self.path[-1]
        allowed = set(self.end_tokens) if node < 0 else set(self.trie.children[node])
        if node >= 0 and self.trie.ends[node] is not None:
            allowed |= self.end_tokens
        set_tokens(bitmask, row, allowed)

    @property
    def is_terminated(self) -> bool:
        return self.path[-1] < 0
