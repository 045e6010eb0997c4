"""`DraftModelProposer`: a smaller model with the same tokenizer drafts k tokens greedily.

The draft model runs as a `SideModel` (`engine/side_model.py`: its own paged KV cache, per request the
tokens it holds). Before drafting it catches up with what the request accepted since (the longest common
prefix of its tokens and the request's is kept, the rest recomputed), all requests in one flattened
pass, then drafts one token per pass. Drafts are the draft model's argmax, so q is
one-hot: greedy verification keeps the target's greedy output and rejection sampling its distribution.
Its state is dropped with the request (`retain`); a request the draft cache has no room for drafts nothing.
"""

from __future__ import annotations

import os

import torch

from effllm.core.errors import ConfigError
from effllm.engine.config import EngineConfig
from effllm.engine.request import Request
from effllm.engine.side_model import SideModel
from effllm.engine.spec_decode.proposer import Proposer
from effllm.models.transformer import CausalLM


class DraftModelProposer(Proposer):
    def __init__(self, draft: CausalLM, config: EngineConfig, target_vocab_size: int | None = None):
        if target_vocab_size is not None and draft.config.vocab_size != target_vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}); a draft model must share the target's tokenizer"
            )
        self.k = config.num_speculative_tokens
        self.side = SideModel(draft, config, config.speculative_max_running, extra_tokens=self.k)
        self.model, self.cache = self.side.model, self.side.cache

    @property
    def states(self):
        return self.side.states

    @property
    def free(self) -> list[int]:
        return self.side.free

    @classmethod
    def load(cls, path: str | os.PathLike, target: CausalLM, config: EngineConfig) -> DraftModelProposer:
        from effllm.models.checkpoint import load_model

        draft = load_model(path, dtype=target.dtype, device=target.device)
        return cls(draft, config, target.config.vocab_size)

    def retain(self, requests: list[Request]) -> None:
        self.side.retain(requests)

    @torch.inference_mode()
    def propose(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        live, starts = [], []
        for i, (request, k) in enumerate(zip(requests, limits, strict=True)):
            same = self.side.start(request, k - 1)
            if same is not None:
                live.append(i)
                starts.append(same)
        if not live:
            return drafts
        # Pass 0 catches up (each request's uncomputed tokens, its last token included); pass s feeds draft s.
        feed = [requests[i].token_ids[s:] for i, s in zip(live, starts, strict=True)]
        computed = list(starts)
        for step in range(max(limits[i] for i in live)):
            active = [j for j, i in enumerate(live) if step < limits[i]]
            hidden = self.side.run(
                [requests[live[j]] for j in active], [feed[j] for j in active], [computed[j] for j in active]
            )
            tokens = self.model.logits(hidden).argmax(dim=-1).tolist()
            for j, token in zip(active, tokens, strict=True):
                computed[j] += len(feed[j])
                drafts[live[j]].append(token)
                feed[j] = [token]
        return drafts
