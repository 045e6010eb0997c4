"""`EarlyExitProposer`: LayerSkip's self-speculation (arXiv 2404.16710).

The target model's own first E layers, then its shared final norm and LM head, draft k tokens one at a
time (greedy). They run in the target's KV cache: the keys and values they write for layers below E are
exactly the target's, so verification runs only layers E and up, from the hidden states the drafting
kept (`Request.draft_hidden`), for the last token and every draft. Drafting takes k + 1 shallow passes
(the last gives the final draft's layer-E input) and verification one pass over L - E layers.

A model not trained for early exit drafts poorly from shallow layers (its acceptance is low, the output
still exact); `effllm train --method early-exit` trains one that does (docs/decoding.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from effllm.core.errors import ConfigError
from effllm.engine.request import DraftHidden, Request
from effllm.engine.spec_decode.proposer import Proposer
from effllm.engine.step_layout import build_step_layout

if TYPE_CHECKING:
    from effllm.engine.block_manager import BlockManager
    from effllm.engine.model_runner import ModelRunner


class EarlyExitProposer(Proposer):
    def __init__(self, runner: ModelRunner, blocks: BlockManager, exit_layer: int | None = None):
        num_layers = runner.model.config.num_hidden_layers
        exit_layer = max(1, num_layers // 2) if exit_layer is None else exit_layer
        if not 1 <= exit_layer <= num_layers:
            raise ConfigError(
                f"--speculative-exit-layer must be between 1 and the model's {num_layers} layers, got {exit_layer}"
            )
        self.runner, self.blocks, self.exit_layer = runner, blocks, exit_layer

    @torch.inference_mode()
    def propose(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        # The drafts' slots must be the request's before they are written: take them now (the scheduler's
        # allocation for the same tokens then finds them there). A request that cannot have them drafts none.
        live = [
            i for i, (r, k) in enumerate(zip(requests, limits, strict=True)) if self.blocks.allocate(r, 1 + k)
        ]
        if not live:
            return drafts
        runner, model = self.runner, self.runner.model
        fed = {i: requests[i].token_ids[-1] for i in live}
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        for step in range(max(limits[i] for i in live) + 1):
            active = [i for i in live if step <= limits[i]]
            layout = build_step_layout(
                [[fed[i]] for i in active],
                [requests[i].num_computed_tokens + step for i in active],
                [requests[i].block_ids for i in active],
                [0] * len(active),
                runner.block_size,
                runner.device,
            )
            n = len(active)
            hidden = runner.forward_layers(layout, [0] * n, [self.exit_layer] * n)
            for j, i in enumerate(active):
                rows[i].append(hidden[j])
            wanting = [j for j, i in enumerate(active) if step < limits[i]]  # the last pass drafts nothing
            if not wanting:
                break
            index = torch.tensor(wanting, dtype=torch.long, device=hidden.device)
            tokens = model.logits(model.model.norm(hidden[index])).argmax(dim=-1).tolist()
            for j, token in zip(wanting, tokens, strict=True):
                drafts[active[j]].append(token)
                fed[active[j]] = token
        for i in live:
            requests[i].draft_hidden = DraftHidden(self.exit_layer, torch.stack(rows[i]))
        return drafts
