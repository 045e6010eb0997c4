"""The proposer interface, and which requests may take drafts.

A proposer looks at running requests whose every token but the last is computed and returns, for each,
the tokens it guesses come next. The engine trims each guess to what the request can still hold and
schedules it with the request's last token; verification keeps what the target model agrees with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from effllm.engine.request import Request


class Proposer(ABC):
    """Base of the proposers: `propose` is required, `retain` optional (for proposers that keep state)."""

    @abstractmethod
    def propose(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Draft tokens for each request (an empty list for none), in the order given; at most `limits[i]`
        for request i (what it can still hold, never more than the configured k)."""

    def retain(self, requests: list[Request]) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Called each step with the running requests: state kept for any other request can go."""


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


def propose_drafts(proposer: Proposer, requests: list[Request], max_model_len: int, k: int) -> None:
    """Set `draft_token_ids` of the requests that can take drafts, at most k each and what each can hold."""
    eligible = [r for r in requests if can_take_drafts(r)]
    limits = [min(k, max_drafts(r, max_model_len)) for r in eligible]
    eligible = [r for r, n in zip(eligible, limits, strict=True) if n > 0]
    if not eligible:
        return
    limits = [n for n in limits if n > 0]
    for request, drafts, limit in zip(eligible, proposer.propose(eligible, limits), limits, strict=True):
        request.draft_token_ids = [int(t) for t in drafts[:limit]]
