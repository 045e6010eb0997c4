"""More than one token per request per step: drafts verified in one pass give exactly greedy decoding.

A fake proposer drafts k tokens per request from the true greedy continuation with some of them
corrupted, so every step mixes accepted and rejected drafts; the engine must return the tokens of plain
greedy decoding, free every block, and never serve a wrong prefix from the cache.
"""

import random

import pytest
import torch

from effllm.engine import LLM, SamplingParams
from effllm.engine.spec_decode.proposer import Proposer
from effllm.engine.spec_decode.verify import accept_greedy


class CorruptingProposer(Proposer):
    def __init__(self, truth: dict[tuple[int, ...], list[int]], k: int, wrong: float, seed: int = 0):
        self.truth, self.k, self.wrong, self.rng = truth, k, wrong, random.Random(seed)
        self.num_drafts = 0

    def propose(self, requests, limits):
        drafts = []
        for request, limit in zip(requests, limits, strict=True):
            full = self.truth[tuple(request.prompt_token_ids)]
            done = request.num_output_tokens
            guess = list(full[done : done + min(self.k, limit)])
            guess = [(t + 1) % 128 if self.rng.random() < self.wrong else t for t in guess]
            self.num_drafts += len(guess)
            drafts.append(guess)
        return drafts


def prompts(n=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 128, (int(m),), generator=gen).tolist()
        for m in torch.randint(5, 60, (n,), generator=gen)
    ]


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_targets_next_token():
    sampled = [(5, "a"), (6, "b"), (9, "c"), (4, "d")]
    assert accept_greedy([5, 6, 7], sampled) == [(5, "a"), (6, "b"), (9, "c")]
    assert accept_greedy([5, 6, 9], sampled) == sampled
    assert accept_greedy([1, 6, 4], sampled) == [(5, "a")]
    assert accept_greedy([], [(3, None)]) == [(3, None)]
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [(1, None)])


@pytest.mark.parametrize(("k", "wrong"), [(1, 0.0), (3, 0.3), (4, 1.0)])
def test_drafted_decoding_equals_plain_greedy(tiny_llama, k, wrong):
    params = SamplingParams(temperature=0, max_tokens=24)
    batch = [{"prompt_token_ids": p} for p in prompts()]
    plain = [o.token_ids for o in LLM(tiny_llama).generate(batch, params, use_tqdm=False)]
    truth = {tuple(p["prompt_token_ids"]): out for p, out in zip(batch, plain, strict=True)}
    llm = LLM(tiny_llama, max_num_batched_tokens=64, block_size=4, speculative_adaptive=False)
    llm.engine.proposer = proposer = CorruptingProposer(truth, k, wrong)
    steps_before = llm.engine.stats.num_steps
    assert [o.token_ids for o in llm.generate(batch, params, use_tqdm=False)] == plain
    assert proposer.num_drafts > 0
    if wrong == 0.0:  # all drafts right: each step takes k + 1 tokens, so fewer steps than tokens
        assert llm.engine.stats.num_steps - steps_before < len(batch) * params.max_tokens / 1.5
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)
    # The same prompts again hit the prefix cache; a block holding a rejected draft would give other tokens.
    again = [o.token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    assert again == plain
    assert llm.engine.stats.num_prefix_cache_hit_tokens > 0


def test_requests_with_penalties_take_no_drafts(tiny_llama):
    batch = [{"prompt_token_ids": p} for p in prompts(2)]
    truth = {tuple(p["prompt_token_ids"]): list(range(64)) for p in batch}
    llm = LLM(tiny_llama, speculative_adaptive=False)
    llm.engine.proposer = proposer = CorruptingProposer(truth, 3, 0.0)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=8, repetition_penalty=1.2)
    llm.generate(batch, params, use_tqdm=False)
    assert proposer.num_drafts == 0
