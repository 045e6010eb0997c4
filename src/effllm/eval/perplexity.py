"""Perplexity of a text under a causal LM, with a sliding window, per token, per word and per byte.

The text is encoded without special tokens and every token is predicted, the first from the prefix token
(BOS, else EOS) as lm-eval's `loglikelihood_rolling` does; with neither, the first token is context only. A text longer than the model's window is read in
windows of `max_length` tokens whose ends advance by `stride`: each window scores only the tokens it adds, so
every token is scored once, with at least `max_length - stride` tokens of context once the text is that long.
`stride == max_length` gives disjoint windows, lm-eval's `loglikelihood_rolling` (which, with a tokenizer that
adds BOS, also predicts that BOS after its prefix BOS; this does not, as lm-eval with add_bos_token=False); a
smaller stride gives more context per token (lower perplexity) for more compute.

Per-word perplexity divides the same total NLL by the number of whitespace-separated words, so models with
different tokenizers (and the word-bigram baseline) compare on one scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from effllm.core.errors import InputError
from effllm.eval.loglikelihood import prefix_token_id, token_logprobs
from effllm.eval.progress import progress_bar
from effllm.models.soft_prompt import context_length


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # total negative log-likelihood of the scored tokens, nats
    tokens: int  # tokens scored
    words: int  # whitespace-separated words of the text
    bytes: int  # UTF-8 bytes of the text
    max_length: int
    stride: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "token_perplexity": self.token_perplexity,
            "word_perplexity": self.word_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) windows over a sequence of n_tokens (prefix included): each reads
    sequence[begin:end] (at most max_length) and scores its last n_scored predictions, i.e. the tokens
    sequence[end - n_scored + 1 : end + 1]. Together they score sequence[1:] once each."""
    if not 1 <= stride <= max_length:
        raise InputError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    windows, scored = [], 0
    last = n_tokens - 1  # the number of tokens to predict
    while scored < last:
        end = min(max_length if scored == 0 else scored + stride, last)
        windows.append((max(0, end - max_length), end, end - scored))
        scored = end
    return windows


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `text` (see the module docstring). `max_length` defaults to the model's context
    (max_position_embeddings, less a soft prompt's tokens), `stride` to half of `max_length`."""
    max_length = max_length or context_length(model)
    if max_length < 1:
        raise InputError(f"max_length must be positive, got {max_length}")
    stride = stride or max(1, max_length // 2)
    ids = tokenizer.encode(text, add_special_tokens=False)
    prefix = prefix_token_id(tokenizer)
    sequence = ([prefix] if prefix is not None else []) + ids
    if len(sequence) < 2:
        raise InputError("the text is too short to score: it needs at least one token after the first")
    windows = rolling_windows(len(sequence), max_length, stride)
    nll = 0.0
    with progress_bar(len(windows), "perplexity", progress) as bar:
        for start in range(0, len(windows), batch_size):
            nll += _window_nll(model, sequence, windows[start : start + batch_size])
            bar.update(min(batch_size, len(windows) - start))
    return PerplexityResult(
        nll=nll,
        tokens=len(sequence) - 1,
        words=len(text.split()),
        bytes=len(text.encode("utf-8")),
        max_length=max_length,
        stride=stride,
    )


def _window_nll(model, sequence: list[int], windows: list[tuple[int, int, int]]) -> float:
    width = max(end - begin for begin, end, _ in windows)
    input_ids = torch.zeros(len(windows), width, dtype=torch.long)
    batch_index, positions, targets = [], [], []
    for b, (begin, end, n_scored) in enumerate(windows):
        input_ids[b, : end - begin] = torch.tensor(sequence[begin:end])
        batch_index += [b] * n_scored
        positions += range(end - begin - n_scored, end - begin)
        targets += sequence[end - n_scored + 1 : end + 1]
    logprobs, _ = token_logprobs(model, input_ids, batch_index, positions, targets)
    return -float(logprobs.double().sum())
