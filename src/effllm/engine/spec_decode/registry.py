"""`make_proposer`: the proposer `--speculative-method` names, built for an engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from effllm.engine.config import EngineConfig
from effllm.engine.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from effllm.engine.block_manager import BlockManager
    from effllm.engine.model_runner import ModelRunner


def make_proposer(config: EngineConfig, runner: ModelRunner, blocks: BlockManager) -> Proposer | None:
    """The proposer of a resolved engine config (None without speculative decoding)."""
    method, k = config.speculative_method, config.num_speculative_tokens
    if method == "ngram":
        from effllm.engine.spec_decode.ngram import NgramProposer

        return NgramProposer(k, config.prompt_lookup_min, config.prompt_lookup_max)
    if method == "early-exit":
        from effllm.engine.spec_decode.early_exit import EarlyExitProposer

        return EarlyExitProposer(runner, blocks, config.speculative_exit_layer)
    if method == "draft":
        from effllm.engine.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer.load(config.speculative_model, runner.model, config)
    return None
