"""ULD's logit difference (arXiv 2406.08607): serve `base - w * assistant`, forgetting what the assistant knows.

`effllm serve --uld-assistant PATH` (and `generate`, `LLM(uld_assistant=...)`): the assistant, a small
model trained by `effllm train --method uld` to know only the forget set (`train/unlearn.py`), runs beside
the model as a `SideModel` (its own KV cache) over every request's tokens, and the logits each request
samples from are combined as ULD's greedy decoding does (`uld/model/gen_util.py`):

- with the relative-top filter r > 0 (`--uld-filter`, default ULD's 0.1): from the base's log-softmax,
  the tokens below min(max + ln r, the (r V)-th largest) are masked; the assistant's logits are zeroed
  there, the combination is base + (-w) * assistant on raw logits, and the masked tokens are never drawn;
- with r = 0: log_softmax(base) - w * log_softmax(assistant).

w (`--uld-weight`) is 1 by default (ULD's weight -1). The combination replaces the logits before the
structured-output mask, penalties and temperature. Speculative decoding and prompt logprobs, which need
several rows of logits per request, are refused alongside it.
"""

from __future__ import annotations

import math
import os

import torch

from effllm.core.errors import ConfigError
from effllm.engine.config import EngineConfig
from effllm.engine.request import Request
from effllm.engine.side_model import SideModel
from effllm.models.transformer import CausalLM

NEG_INF = float("-inf")


def relative_top_mask(base_logits: torch.Tensor, relative_top: float) -> torch.Tensor:
    """True where a token falls outside the base's relative-top set (ULD's / DoLa's filter)."""
    logp = base_logits.float().log_softmax(dim=-1)
    keep_at_least = max(1, int(relative_top * logp.shape[-1]))
    kth = logp.topk(keep_at_least, dim=-1).values[..., -1:]
    threshold = torch.minimum(kth, logp.max(dim=-1, keepdim=True).values + math.log(relative_top))
    return logp < threshold


def logit_difference(
    base_logits: torch.Tensor, assistant_logits: torch.Tensor, weight: float = 1.0, relative_top: float = 0.1
) -> torch.Tensor:
    """ULD's combined logits [..., V] (float32)."""
    base, assistant = base_logits.float(), assistant_logits.float()
    if relative_top <= 0:
        return base.log_softmax(dim=-1) - weight * assistant.log_softmax(dim=-1)
    mask = relative_top_mask(base, relative_top)
    combined = base - weight * assistant.masked_fill(mask, 0.0)
    return combined.masked_fill(mask, NEG_INF)


class LogitDifference:
    """The engine's logits combiner: per sampled request, base - w * assistant at its last token."""

    def __init__(self, assistant: CausalLM, config: EngineConfig, vocab_size: int, num_blocks: int):
        if assistant.config.vocab_size != vocab_size:
            raise ConfigError(
                f"the ULD assistant's vocabulary ({assistant.config.vocab_size} tokens) differs from the "
                f"model's ({vocab_size}); train it from this model with `effllm train --method uld`"
            )
        self.weight, self.relative_top = config.uld_weight, config.uld_filter
        # As many blocks as the model's cache: whatever the scheduler runs, the assistant holds too.
        self.side = SideModel(assistant, config, config.max_num_seqs, num_blocks=num_blocks)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: CausalLM, config: EngineConfig, num_blocks: int
    ) -> LogitDifference:
        from effllm.models.checkpoint import load_model

        assistant = load_model(path, dtype=model.dtype, device=model.device)
        return cls(assistant, config, model.config.vocab_size, num_blocks)

    def retain(self, requests: list[Request]) -> None:
        self.side.retain(requests)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """`logits` [R, V]: one row per request in `requests` (no drafts), each at its last token."""
        starts = [self.side.start(r) for r in requests]
        if None in starts:  # cannot happen while the side cache has as many blocks as the model's
            raise RuntimeError("the ULD assistant's KV cache is full; lower max_num_seqs or max_model_len")
        feeds = [r.token_ids[s:] for r, s in zip(requests, starts, strict=True)]
        hidden = self.side.run(requests, feeds, starts)
        assistant = self.side.model.logits(hidden)
        return logit_difference(logits, assistant, self.weight, self.relative_top).to(logits.dtype)
