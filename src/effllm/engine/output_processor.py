"""Turning sampled tokens into `RequestOutput`s: incremental detokenization, stop strings, n > 1 samples.

Stop strings are matched in the detokenized text; the text is cut where the stop string begins (or
after it, with include_stop_str_in_output) and the request finishes. While a request runs, the text
it streams holds back a tail that could still grow into a stop string, so no client ever sees the
first characters of a stop string that later cuts the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from effllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from effllm.engine.request import Request
from effllm.engine.sampling_params import SamplingParams
from effllm.models.detokenize import IncrementalDetokenizer


@dataclass
class Sample:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    sent_tokens: int = 0  # output tokens already reported
    sent_chars: int = 0  # characters of text already reported
    detokenized: int = 0  # output tokens already fed to the detokenizer


@dataclass
class ParentRequest:
    """A prompt as the caller submitted it; its n samples are scheduled as separate requests."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def new_sample(self, request: Request) -> Sample:
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids[request.num_virtual_tokens :],
                skip_special_tokens=request.params.skip_special_tokens,
            )
        return Sample(request, detokenizer)

    def add_tokens(self, sample: Sample) -> str | None:
        """Detokenize the sample's new tokens; returns the stop string that ends it, if one does."""
        request, params = sample.request, sample.request.params
        if sample.detokenizer is None:
            return None
        seen = len(sample.text)
        for token in request.token_ids[request.num_prompt_tokens + sample.detokenized :]:
            sample.text += sample.detokenizer.add(token)
        sample.detokenized = request.num_output_tokens
        if request.is_finished:
            sample.text += sample.detokenizer.flush()
        if not params.stop or request.num_output_tokens < params.min_tokens:
            return None
        return _cut_at_stop(sample, params, seen)

    def make_output(self, parent: ParentRequest, final_only: bool = False) -> RequestOutput:
        """The parent's output now; it marks what it reports as sent, so deltas never repeat."""
        completions = []
        for index, sample in enumerate(parent.samples):
            request = sample.request
            tokens = request.output_token_ids
            end = (
                len(sample.text)
                if request.is_finished
                else len(sample.text) - _held_back(sample, parent.params)
            )
            completions.append(
                CompletionOutput(
                    index=index,
                    text=sample.text if request.is_finished else sample.text[:end],
                    token_ids=tokens,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    logprobs=list(request.logprobs) if parent.params.logprobs is not None else None,
                    delta_text=sample.text[sample.sent_chars : end],
                    delta_token_ids=tokens[sample.sent_tokens :],
                    num_draft_tokens=request.num_draft_tokens,
                    num_accepted_tokens=request.num_accepted_tokens,
                )
            )
            if not final_only:
                sample.sent_chars, sample.sent_tokens = max(end, sample.sent_chars), len(tokens)
        first = parent.samples[0].request
        times = [s.request.first_token_time for s in parent.samples if s.request.first_token_time is not None]
        metrics = RequestMetrics(
            parent.arrival_time,
            min(times) if times else None,
            max(s.request.finish_time for s in parent.samples) if parent.finished else None,
        )
        return RequestOutput(
            parent.request_id,
            parent.prompt,
            parent.prompt_token_ids,
            completions,
            parent.finished,
            metrics,
            max(0, first.num_cached_tokens - first.num_virtual_tokens),
            None if first.prompt_logprobs is None else list(first.prompt_logprobs),
        )


def _cut_at_stop(sample: Sample, params: SamplingParams, seen: int) -> str | None:
    """Find the earliest stop string in the text new since `seen`; cut the text there."""
    best = None
    for stop in params.stop:
        i = sample.text.find(stop, max(0, seen - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    if best is None:
        return None
    i, stop = best
    sample.text = sample.text[: i + len(stop) if params.include_stop_str_in_output else i]
    return stop


def _held_back(sample: Sample, params: SamplingParams) -> int:
    """Length of the text's longest tail that is a proper prefix of a stop string."""
    hold = 0
    for stop in params.stop:
        for k in range(min(len(stop) - 1, len(sample.text)), hold, -1):
            if sample.text.endswith(stop[:k]):
                hold = k
                break
    return hold
