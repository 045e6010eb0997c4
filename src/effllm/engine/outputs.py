"""What the engine returns: a `RequestOutput` per prompt, holding one `CompletionOutput` per sample.

Each carries the whole result so far (text, token_ids) and what this step added (delta_text,
delta_token_ids): an offline caller reads the first, a streaming server sends the second.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string, when one ended it
    logprobs: list[dict[int, float]] | None = None  # per output token: {token id: log-probability}
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # speculative decoding: drafts verified for this sample
    num_accepted_tokens: int = 0  # of those, the ones the model agreed with (each saved a forward)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Monotonic-clock times (time.monotonic) of the request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    # With prompt_logprobs: per prompt token, {token id: logprob} given the tokens before it (None for the first).
    prompt_logprobs: list[dict[int, float] | None] | None = None

    # The first sample's fields, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def num_draft_tokens(self) -> int:
        return sum(o.num_draft_tokens for o in self.outputs)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(o.num_accepted_tokens for o in self.outputs)
