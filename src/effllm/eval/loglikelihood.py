"""Log-likelihood of continuations given contexts, computed as lm-evaluation-harness (0.4) computes it.

For each (context, continuation) pair, as lm-eval's `LM._encode_pair` and `HFLM._loglikelihood_tokens`:
- trailing whitespace of the context moves to the front of the continuation;
- context + continuation is encoded whole with the tokenizer's special tokens (BOS for Llama), the context
  alone likewise, and the continuation's tokens are those of the whole after the context's;
- an empty context becomes the prefix token (BOS, else EOS);
- the model reads (context + continuation)[-(max_length + 1):][:-1] and the continuation's log-probabilities
  are summed; `is_greedy` says whether every continuation token is the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effllm.core.errors import InputError
from effllm.eval.progress import progress_bar
from effllm.models.soft_prompt import context_length, virtual_ids


def prefix_token_id(tokenizer) -> int | None:
    """The token that stands for "start of text" when there is no context: BOS, else EOS (lm-eval's choice)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split as lm-eval splits them (see the module docstring)."""
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if prefix is None:
            raise InputError("an empty context needs a tokenizer with a BOS or EOS token to stand for it")
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def score_continuations(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is_greedy) for each (context_ids, continuation_ids) pair.

    Pairs run longest first in batches of `batch_size`, right-padded; a context too long for `max_length`
    (default: the model's max_position_embeddings, less a soft prompt's tokens) loses tokens from its left.
    """
    max_length = max_length or context_length(model)
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise InputError("a continuation encodes to no tokens; every choice must be non-empty text")
        if len(continuation) > max_length:
            raise InputError(f"a continuation of {len(continuation)} tokens exceeds max_length {max_length}")
        tokens = [*context, *continuation][-(max_length + 1) :]
        rows.append((tokens, len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    with progress_bar(len(rows), "loglikelihood", progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            scores = _score_batch(model, [rows[i] for i in batch])
            for i, score in zip(batch, scores, strict=True):
                results[i] = score
            bar.update(len(batch))
    return results


def _score_batch(model, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """rows: (tokens, n_scored): tokens[:-1] is read and the last n_scored tokens are predicted."""
    width = max(len(tokens) - 1 for tokens, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    batch_index, positions, targets, lengths = [], [], [], []
    for b, (tokens, n_scored) in enumerate(rows):
        n_in = len(tokens) - 1
        input_ids[b, :n_in] = torch.tensor(tokens[:-1])
        batch_index += [b] * n_scored
        positions += range(n_in - n_scored, n_in)
        targets += tokens[-n_scored:]
        lengths.append(n_scored)
    logprobs, greedy = token_logprobs(model, input_ids, batch_index, positions, targets)
    out = []
    for lp, hit in zip(logprobs.split(lengths), greedy.split(lengths), strict=True):
        out.append((float(lp.sum()), bool(hit.all())))
    return out


def token_logprobs(
    model, input_ids: torch.Tensor, batch_index: list[int], positions: list[int], targets: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[i]) at (batch_index[i], positions[i]) of a causal forward over input_ids [B, T], and
    whether each target is the argmax. Only the scored positions go through the LM head, in float32."""
    device = model.device
    prefix = virtual_ids(model)  # a soft prompt leads every row; the scored positions move right
    if prefix:
        lead = torch.tensor(prefix, dtype=input_ids.dtype).expand(input_ids.shape[0], -1)
        input_ids = torch.cat([lead, input_ids], dim=1)
        positions = [p + len(prefix) for p in positions]
    hidden = model.hidden_states(input_ids.to(device))  # [B, T, hidden]
    index_b = torch.tensor(batch_index, device=device)
    index_t = torch.tensor(positions, device=device)
    logits = model.logits(hidden[index_b, index_t]).float()  # [n, vocab]
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(targets, device=device)
    picked = logprobs.gather(1, target[:, None]).squeeze(1)
    return picked.cpu(), (logprobs.argmax(-1) == target).cpu()


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood`: (log p(continuation | context), is_greedy) per (context, continuation)."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    return score_continuations(model, pairs, batch_size=batch_size, max_length=max_length, progress=progress)
