"""`Request`: the state of one sequence in the engine.

As in vLLM V1 there is no prefill or decode phase: a request holds its tokens (prompt, then outputs)
and `num_computed_tokens`, how many of them have keys and values in the KV cache. Each step computes
some of the rest; when all are computed the step samples one more token. A prompt prefilled in
chunks, a decode and a recompute after preemption are all the same thing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from effllm.engine.sampling_params import SamplingParams
from effllm.engine.structured.grammar import Grammar


@dataclass
class DraftHidden:
    """Hidden states [1 + drafts, hidden] of a request's last token and drafts after layer `start_layer - 1`
    (the input of layer `start_layer`), whose keys and values below it are already in the KV cache."""

    start_layer: int
    hidden: torch.Tensor


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence: with n > 1 a prompt becomes n requests that share the prompt's cached blocks."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        seed: int | None = None,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)  # prompt, then outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        # A soft prompt's virtual token ids (>= the vocabulary) lead the prompt: the engine adds them.
        self.num_virtual_tokens = 0
        # The LoRA adapter serving the request (its index in the engine's list; None: the base model). Its
        # name salts the prefix-cache keys: keys and values differ between adapters.
        self.adapter_index: int | None = None
        self.cache_salt: str | None = None
        self.num_computed_tokens = 0
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.generator: torch.Generator | None = None
        self.seed = seed
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        # Tokens proposed after the last one (speculative decoding): computed in the next step with it and
        # kept only as far as the model agrees; never part of token_ids until accepted.
        self.draft_token_ids: list[int] = []
        # An early-exit proposer's hand-off: the drafted rows' hidden states after its exit layer, so that
        # verification runs only the layers above it (`EarlyExitProposer`); None otherwise.
        self.draft_hidden: DraftHidden | None = None
        self.num_draft_tokens = 0  # drafts verified for this request (speculative decoding)
        self.num_accepted_tokens = 0  # of those, the ones the target model agreed with
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks, for prefix caching
        self.num_registered_blocks = 0  # blocks of block_ids already offered to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache when first scheduled
        self.num_preemptions = 0
        # With n > 1, samples after the first wait until it has prefilled the prompt, then share its blocks.
        self.wait_for: Request | None = None
        self.logprobs: list[dict[int, float]] = []
        # With params.prompt_logprobs: per prompt position, {token: logprob} of that token given those before
        # it (and the k likeliest); position 0 has none. Filled by the prefill, chunk by chunk.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            None if params.prompt_logprobs is None else [None] * len(prompt_token_ids)
        )
        # With params.structured: this request's matcher, advanced by every token appended.
        self.grammar: Grammar | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prefilled(self) -> bool:
        """Whether the prompt's keys and values have been computed (once, at least)."""
        return self.num_computed_tokens >= self.num_prompt_tokens or self.num_output_tokens > 0

    def samples_after(self, num_new_tokens: int) -> bool:
        """Whether computing `num_new_tokens` more tokens reaches the end (drafts included): a step samples."""
        return self.num_computed_tokens + num_new_tokens == self.num_tokens + len(self.draft_token_ids)

    def sampling_generator(self, device: torch.device) -> torch.Generator | None:
        """This request's own random stream (seeded requests only), made on first use."""
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def clear_drafts(self) -> None:
        self.draft_token_ids = []
        self.draft_hidden = None

    def append_token(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        if self.grammar is not None and not self.grammar.accept(token_id):
            raise RuntimeError(f"token {token_id} breaks the request's structured-output constraint")
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def check_stop(self, max_model_len: int) -> bool:
        """After a token was appended: finish on EOS, a stop token, max_tokens or the context length."""
        token, produced = self.token_ids[-1], self.num_output_tokens
        if produced >= self.params.min_tokens:
            if token in self.eos_token_ids:
                self.finish("stop")
                return True
            if token in self.params.stop_token_ids:
                self.finish("stop", stop_reason=token)
                return True
        max_tokens = self.params.max_tokens
        if (max_tokens is not None and produced >= max_tokens) or self.num_tokens >= max_model_len:
            self.finish("length")
            return True
        return False

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value})"
        )
