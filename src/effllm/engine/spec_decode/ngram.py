"""`NgramProposer`: prompt lookup decoding. The last n tokens of a request (n from `max_n` down to `min_n`)
are searched for in its own earlier tokens, prompt and output; what followed the most recent earlier match
is proposed, up to `k` tokens. No model runs, so a draft costs nothing; it pays when the output repeats
its context (continuing, editing or quoting a passage, code). Like vLLM's `[ngram]` method.
"""

from __future__ import annotations

from effllm.engine.request import Request
from effllm.engine.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    def __init__(self, k: int = 4, min_n: int = 1, max_n: int = 4):
        if k < 1 or not 1 <= min_n <= max_n:
            raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        return [
            lookup(r.token_ids, min(self.k, n), self.min_n, self.max_n)
            for r, n in zip(requests, limits, strict=True)
        ]


def lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (between max_n and min_n long) that occurs earlier; [] when none does."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        first = suffix[0]
        # The latest start i < length - n with tokens[i : i + n] == suffix.
        for i in range(length - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []
