"""The proposer interface, and which requests may take drafts.

A proposer looks at running requests whose every token but the last is computed and returns, for each,
the tokens it guesses come next. The engine trims each guess to what the request can still hold and
schedules it with the request's last token; verification keeps what the target model agrees with.
"""

from __future__ import annotations

from typing import Protocol

from effllm.engine.request import Request


class Proposer(Protocol):
    def propose(self, requests: list[Request]) -> list[list[int]]:
        """Draft tokens for each request (an empty list for none), in the order given."""
        ...


def can_take_drafts(request: Request) -> bool:
    """Requests with no penalties and past min_tokens, whose every token but the last is computed: there
    greedy acceptance (`accept_greedy`) gives exactly the tokens of one-at-a-time decoding, and rejection
    sampling (`rejection.py`) exactly its distribution. (Penalties and min_tokens would change each draft
    position's distribution with the drafts before it.)"""
    p = request.params
    return (
        not p.has_penalties
        and request.num_output_tokens >= p.min_tokens
        and request.num_computed_tokens == request.num_tokens - 1
    )


def max_drafts(request: Request, max_model_len: int) -> int:
    """Most drafts worth computing: the accepted run (drafts + 1) must fit max_tokens and the context."""
    room = max_model_len - request.num_tokens
    if request.params.max_tokens is not None:
        room = min(room, request.params.max_tokens - request.num_output_tokens - 1)
    return max(room, 0)


def propose_drafts(proposer: Proposer, requests: list[Request], max_model_len: int) -> None:
    """Set `draft_token_ids` of the requests that can take drafts, trimmed to what each can hold."""
    eligible = [r for r in requests if can_take_drafts(r)]
    if not eligible:
        return
    for request, drafts in zip(eligible, proposer.propose(eligible), strict=True):
        request.draft_token_ids = [int(t) for t in drafts[: max_drafts(request, max_model_len)]]
