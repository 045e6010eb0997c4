"""Single-sequence generation over a contiguous KV cache: the simple path of `effllm generate`.

Prefill the prompt once, then decode one token per forward, sampling with temperature, top-k and top-p.
The engine (paged cache, continuous batching) is the fast path for many requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from effllm.core.errors import InputError
from effllm.models.kv_cache import ContiguousKVCache
from effllm.models.transformer import CausalLM


@dataclass
class GenerationOptions:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, opts: GenerationOptions, generator: torch.Generator | None) -> int:
    """One token from logits [vocab]."""
    if opts.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / opts.temperature
    if opts.top_k:
        kth = torch.topk(logits, min(opts.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if opts.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= opts.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(model: CausalLM, prompt_ids: list[int], opts: GenerationOptions) -> Iterator[int]:
    """Yield sampled token ids one at a time until a stop token or max_tokens."""
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise InputError("the prompt is empty; give at least one token")
    if len(prompt_ids) >= context:
        raise InputError(
            f"the prompt has {len(prompt_ids)} tokens and the model's context is {context}; shorten the prompt"
        )
    max_new = min(opts.max_tokens, context - len(prompt_ids))
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(opts.seed)
    cache = ContiguousKVCache.for_model(model, batch_size=1, max_len=len(prompt_ids) + max_new)
    ids = torch.tensor([prompt_ids], device=model.device)
    positions = torch.arange(len(prompt_ids), device=model.device)[None]
    for step in range(max_new):
        hidden = model.hidden_states(ids, positions, attn=cache)
        token = sample_next(model.logits(hidden[0, -1]), opts, generator)
        yield token
        if token in opts.stop_token_ids or step == max_new - 1:
            return
        ids = torch.tensor([[token]], device=model.device)
        positions = torch.tensor([[cache.length]], device=model.device)
