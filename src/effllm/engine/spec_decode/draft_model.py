"""`DraftModelProposer`: a smaller model with the same tokenizer drafts k tokens greedily.

The draft model keeps its own paged KV cache (its own blocks, a free list: no prefix cache) and, per
request, the tokens its cache holds. Before drafting it catches up with what the request accepted since
(the longest common prefix of its tokens and the request's is kept, the rest recomputed), all requests
in one flattened pass, then drafts one token per pass. Drafts are the draft model's argmax, so q is
one-hot: greedy verification keeps the target's greedy output and rejection sampling its distribution.
Its state is dropped with the request (`retain`); a request the draft cache has no room for drafts nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from effllm.core.errors import ConfigError
from effllm.engine.attention_backend import make_backend
from effllm.engine.config import EngineConfig
from effllm.engine.kv_cache import PagedKVCache, block_bytes
from effllm.engine.request import Request
from effllm.engine.spec_decode.proposer import Proposer
from effllm.engine.step_layout import build_step_layout
from effllm.models.decode_linear import use_decode_linears
from effllm.models.fused_projections import fuse_projections
from effllm.models.transformer import CausalLM

# The draft model's KV cache: room for speculative_max_running requests at the full context, but never
# more bytes than this (and always room for one request).
DRAFT_CACHE_BYTES_CAP = 512 * 1024**2


@dataclass
class _DraftState:
    block_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the tokens whose keys the draft cache holds


class DraftModelProposer(Proposer):
    def __init__(self, draft: CausalLM, config: EngineConfig, target_vocab_size: int | None = None):
        if target_vocab_size is not None and draft.config.vocab_size != target_vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}); a draft model must share the target's tokenizer"
            )
        self.model, self.k = draft.eval(), config.num_speculative_tokens
        self.block_size = config.block_size
        self.device = draft.device
        per_request = -(-(config.max_model_len + self.k) // self.block_size)
        one_block = block_bytes(draft.config, self.block_size, draft.dtype)
        fit = max(per_request, DRAFT_CACHE_BYTES_CAP // one_block)
        num_blocks = min(config.speculative_max_running * per_request, fit)
        self.cache = PagedKVCache(draft.config, num_blocks, self.block_size, draft.dtype, self.device)
        self.backend = make_backend(config.attention_backend, self.cache)
        if self.device.type == "cpu" and config.cpu_gemv:
            use_decode_linears(draft)
            fuse_projections(draft)
        self.free = list(range(num_blocks - 1, -1, -1))
        self.states: dict[Request, _DraftState] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, target: CausalLM, config: EngineConfig) -> DraftModelProposer:
        from effllm.models.checkpoint import load_model

        draft = load_model(path, dtype=target.dtype, device=target.device)
        return cls(draft, config, target.config.vocab_size)

    def retain(self, requests: list[Request]) -> None:
        keep = set(requests)
        for request in [r for r in self.states if r not in keep]:
            self.free += self.states.pop(request).block_ids

    def _reserve(self, state: _DraftState, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(state.block_ids)
        if need > len(self.free):
            return False
        for _ in range(max(need, 0)):
            state.block_ids.append(self.free.pop())
        return True

    @torch.inference_mode()
    def propose(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        live, starts = [], []
        for i, (request, k) in enumerate(zip(requests, limits, strict=True)):
            state = self.states.setdefault(request, _DraftState())
            tokens = request.token_ids
            same = 0
            for a, b in zip(state.token_ids, tokens, strict=False):
                if a != b:
                    break
                same += 1
            same = min(same, len(tokens) - 1)  # the last token is fed: its logits give the first draft
            state.token_ids = state.token_ids[:same]
            if self._reserve(state, len(tokens) + k - 1):
                live.append(i)
                starts.append(same)
        if not live:
            return drafts
        # Pass 0 catches up (each request's uncomputed tokens, its last token included); pass s feeds draft s.
        feed = [requests[i].token_ids[s:] for i, s in zip(live, starts, strict=True)]
        computed = list(starts)
        for step in range(max(limits[i] for i in live)):
            active = [j for j, i in enumerate(live) if step < limits[i]]
            order = sorted(active, key=lambda j: len(feed[j]) > 1)  # single-token queries first
            layout = build_step_layout(
                [feed[j] for j in order],
                [computed[j] for j in order],
                [self.states[requests[live[j]]].block_ids for j in order],
                [1] * len(order),
                self.block_size,
                self.device,
            )
            self.backend.prepare(layout)
            hidden = self.model.hidden_states(layout.input_ids[None], layout.positions[None], self.backend)[0]
            rows = torch.tensor(layout.sample_rows, dtype=torch.long, device=self.device)
            tokens = self.model.logits(hidden[rows]).argmax(dim=-1).tolist()
            for j, token in zip(order, tokens, strict=True):
                i = live[j]
                state = self.states[requests[i]]
                state.token_ids += feed[j]
                computed[j] += len(feed[j])
                drafts[i].append(token)
                feed[j] = [token]
        return drafts
