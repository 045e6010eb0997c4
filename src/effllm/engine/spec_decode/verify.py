"""Verification of draft tokens against the target model's own choices."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def accept_greedy(drafts: list[int], sampled: list[tuple[int, T]]) -> list[tuple[int, T]]:
    """The longest prefix of `drafts` the target agrees with, then the target's next token.

    `sampled[i]` is the target's (token, logprobs) at the position after drafts[:i], so there are
    len(drafts) + 1 of them. With drafts [5, 6, 7] and target tokens [5, 6, 9, 4], drafts 5 and 6 are
    accepted and 9 replaces 7: the result is tokens [5, 6, 9]. Without drafts it is [sampled[0]].
    For a greedy target this is exact: the output equals decoding one token at a time.
    """
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} target samples, got {len(sampled)}")
    n = 0
    while n < len(drafts) and sampled[n][0] == drafts[n]:
        n += 1
    return sampled[: n + 1]
