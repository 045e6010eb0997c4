"""`SideModel`: a second model run beside the engine's on the same requests, with its own KV cache.

The draft model of speculative decoding (`spec_decode/draft_model.py`) and ULD's unlearning assistant
(`logit_difference.py`) both run another model over each request's tokens. Each keeps its own paged KV
cache (its own blocks and free list; no prefix cache) and, per request, the tokens its cache holds.
Before running, a request is caught up: the longest common prefix of what the cache holds and the
request's tokens is kept (at most all but the last token, whose output is wanted) and the rest is
recomputed, every request in one flattened pass. State is dropped with the request (`retain`); a request
the cache has no room for is left out (`start` returns None) and the caller does without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from effllm.engine.attention_backend import make_backend
from effllm.engine.config import EngineConfig
from effllm.engine.kv_cache import PagedKVCache, block_bytes
from effllm.engine.request import Request
from effllm.engine.step_layout import build_step_layout
from effllm.models.decode_linear import use_decode_linears
from effllm.models.fused_projections import fuse_projections
from effllm.models.transformer import CausalLM

# The side cache: room for `max_requests` requests at the full context, but never more bytes than this
# (and always room for one request).
SIDE_CACHE_BYTES_CAP = 512 * 1024**2


@dataclass
class SideState:
    block_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the tokens whose keys the side cache holds


class SideModel:
    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig,
        max_requests: int,
        extra_tokens: int = 0,
        num_blocks: int | None = None,
    ):
        """A cache of `num_blocks` blocks, or by default room for `max_requests` requests of the full
        context plus `extra_tokens`, within SIDE_CACHE_BYTES_CAP."""
        self.model = model.eval()
        self.block_size = config.block_size
        self.device = model.device
        if num_blocks is None:
            per_request = -(-(config.max_model_len + extra_tokens) // self.block_size)
            one_block = block_bytes(model.config, self.block_size, model.dtype)
            fit = max(per_request, SIDE_CACHE_BYTES_CAP // one_block)
            num_blocks = min(max_requests * per_request, fit)
        self.cache = PagedKVCache(model.config, num_blocks, self.block_size, model.dtype, self.device)
        self.backend = make_backend(config.attention_backend, self.cache)
        if self.device.type == "cpu" and config.cpu_gemv:
            use_decode_linears(model)
            fuse_projections(model)
        self.free = list(range(num_blocks - 1, -1, -1))
        self.states: dict[Request, SideState] = {}

    def retain(self, requests: list[Request]) -> None:
        """Drop the state (and free the blocks) of every request not in `requests`."""
        keep = set(requests)
        for request in [r for r in self.states if r not in keep]:
            self.free += self.states.pop(request).block_ids

    def start(self, request: Request, extra_tokens: int = 0) -> int | None:
        """Tokens of `request` the cache keeps (the rest is to be fed), after reserving room for all of its
        tokens plus `extra_tokens`; None when the cache has no room for it."""
        state = self.states.setdefault(request, SideState())
        tokens = request.token_ids
        same = 0
        for a, b in zip(state.token_ids, tokens, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(tokens) - 1)  # the last token is fed: its output is what is wanted
        state.token_ids = state.token_ids[:same]
        need = -(-(len(tokens) + extra_tokens) // self.block_size) - len(state.block_ids)
        if need > len(self.free):
            return None
        for _ in range(max(need, 0)):
            state.block_ids.append(self.free.pop())
        return same

    def run(self, requests: list[Request], feeds: list[list[int]], computed: list[int]) -> torch.Tensor:
        """Feed each request its tokens (after its `computed` cached ones); the final hidden state at each
        feed's last token, [len(requests), hidden], in the order given. The caches then hold the feeds."""
        order = sorted(range(len(requests)), key=lambda j: len(feeds[j]) > 1)  # single-token queries first
        layout = build_step_layout(
            [feeds[j] for j in order],
            [computed[j] for j in order],
            [self.states[requests[j]].block_ids for j in order],
            [1] * len(order),
            self.block_size,
            self.device,
        )
        self.backend.prepare(layout)
        hidden = self.model.hidden_states(layout.input_ids[None], layout.positions[None], self.backend)[0]
        rows = hidden[torch.tensor(layout.sample_rows, dtype=torch.long, device=self.device)]
        out = torch.empty_like(rows)
        out[torch.tensor(order, dtype=torch.long, device=self.device)] = rows
        for j, request in enumerate(requests):
            self.states[request].token_ids += feeds[j]
        return out
