"""`SamplingParams`: how one request samples and when it stops (vLLM's names and meanings)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from effllm.core.errors import InputError
from effllm.engine.structured.spec import StructuredOutputs

_INTS = ("n", "top_k", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs")
_OPTIONAL = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_BOOLS = ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list_of(value: object, kind: type) -> bool:
    ok = _is_int if kind is int else (lambda v: isinstance(v, kind))
    return isinstance(value, (list, tuple)) and all(ok(v) for v in value)


@dataclass
class SamplingParams:
    """Sampling and stopping options of a request; invalid values raise `InputError` at construction.

    temperature 0 means greedy. top_k 0 (or -1) and top_p 1 and min_p 0 switch those filters off.
    repetition_penalty (> 1 discourages) applies to prompt and output tokens as in transformers;
    presence_penalty and frequency_penalty (OpenAI's) to output tokens only. Generation stops at an
    end-of-sequence token (unless ignore_eos), a token of stop_token_ids, a stop string (the text is cut
    where it begins, unless include_stop_str_in_output), max_tokens, or the context length; never before
    min_tokens. seed makes sampling reproducible whatever the batch; with n > 1 sample i uses seed + i.
    logprobs k returns, per output token, the log-probabilities of the sampled token and the k most likely.
    prompt_logprobs k returns, per prompt token after the first, its log-probability given the tokens
    before it and the k most likely there (computed in the prefill; such a prompt skips the prefix cache).
    max_tokens 0 (with prompt_logprobs) scores the prompt and generates nothing.
    structured constrains the output (`StructuredOutputs`, or a dict of its fields: json_schema,
    json_object, regex, grammar or choice); the output then ends when the constraint is complete, so it
    does not combine with min_tokens or ignore_eos. Its logprobs are those of the constrained distribution.
    adapter names the LoRA adapter that serves the request (one the engine loaded with `lora`); None: the
    base model.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutputs | dict[str, Any] | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        self.structured = StructuredOutputs.of(self.structured)
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check_types(self) -> None:
        """Each field of its type (ints are ints, numbers finite), so a bad value fails here, not in a step."""
        for name in _INTS:
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL) and not _is_int(value):
                raise InputError(f"{name} must be an integer, got {value!r}")
        for name in _FLOATS:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.stop is None or isinstance(self.stop, str) or _is_list_of(self.stop, str)):
            raise InputError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not (self.stop_token_ids is None or _is_list_of(self.stop_token_ids, int)):
            raise InputError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - max(self.n, 1):
            raise InputError(f"seed must fit in 64 bits (with n samples, seed + n - 1 too), got {self.seed}")

    def _check(self) -> None:
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.max_tokens is None
                or self.max_tokens >= 1
                or (self.max_tokens == 0 and self.scores_prompt_only),
                f"max_tokens must be at least 1 (0 only with prompt_logprobs, to score a prompt), got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative token ids",
            ),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}",
            ),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (
                self.structured is None or (self.min_tokens == 0 and not self.ignore_eos),
                "structured outputs end when the constraint is complete; drop min_tokens and ignore_eos",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def scores_prompt_only(self) -> bool:
        """max_tokens 0 with prompt_logprobs: the prompt is scored, nothing is generated."""
        return self.max_tokens == 0 and self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
