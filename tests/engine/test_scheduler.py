"""Scheduler invariants, as properties over random workloads (with and without draft tokens to verify).

A fake model stands in for the network: like a real key, what it writes at a token's slot depends on
the token and everything before it (a hash of the prefix). It checks that every earlier position of the
sequence reads back its own value through the block table (so shared prefix blocks, recomputes after
preemption and reused blocks are all consistent), and "samples" a token that is a function of the
sequence alone. So the outputs must equal those of each
request run alone, whatever the batching, chunking, preemption, prefix sharing and drafts (a fake
proposer whose drafts are partly wrong: rejected tokens are rolled back and never reach the prefix cache).
"""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.engine import LLM, SamplingParams
from effllm.engine.block_manager import BlockManager
from effllm.engine.config import EngineConfig
from effllm.engine.request import Request
from effllm.engine.scheduler import Scheduler
from effllm.engine.spec_decode.proposer import Proposer, propose_drafts
from effllm.engine.spec_decode.verify import accept_greedy

BLOCK = 4
VOCAB = 3  # a small alphabet, so that prompts share blocks (and whole prefixes) by chance too


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + len(tokens)) % VOCAB


def run_alone(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def prefix_hashes(tokens: list[int]) -> list[int]:
    out, h = [], 0
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


class ShadowModel:
    """Computes a step's tokens (drafts included) and verifies drafts greedily, as the model runner does."""

    def __init__(self, num_blocks: int):
        self.slots = [-1] * (num_blocks * BLOCK)

    def execute(self, out):
        sampled = {}
        for request, n in zip(out.requests, out.num_tokens, strict=True):
            end = request.num_computed_tokens + n
            tokens = request.token_ids + request.draft_token_ids
            slot = [request.block_ids[p // BLOCK] * BLOCK + p % BLOCK for p in range(end)]
            keys = prefix_hashes(tokens[:end])
            for p in range(request.num_computed_tokens, end):
                self.slots[slot[p]] = keys[p]
            assert [self.slots[s] for s in slot] == keys, "a sequence reads keys that are not its own"
            if end == len(tokens):
                targets = [
                    (next_token(tokens[: request.num_tokens + i]), None)
                    for i in range(len(request.draft_token_ids) + 1)
                ]
                sampled[request] = accept_greedy(request.draft_token_ids, targets)
        return sampled


class FakeProposer(Proposer):
    """Drafts k tokens per request: the first `right` are the true continuation, the rest are wrong."""

    def __init__(self, rng: random.Random, k: int):
        self.rng, self.k = rng, k

    def propose(self, requests, limits):
        drafts = []
        for request, limit in zip(requests, limits, strict=True):
            right = self.rng.randint(0, limit)
            truth = run_alone(request.token_ids, limit)
            drafts.append(truth[:right] + [(t + 1) % VOCAB for t in truth[right:]])
        return drafts


def check_blocks(blocks: BlockManager, live: list[Request]) -> None:
    """Reference counts equal the number of holders; free blocks are exactly those nobody holds; a block
    is shared only when it is a registered prefix-cache block."""
    holders = [0] * blocks.num_blocks
    for request in live:
        for b in request.block_ids:
            holders[b] += 1
    assert holders == blocks.ref_counts
    assert set(blocks.free_queue) == {b for b in range(blocks.num_blocks) if holders[b] == 0}
    assert all(blocks.block_keys[b] is not None for b in range(blocks.num_blocks) if holders[b] > 1)


workloads = st.fixed_dictionaries(
    {
        "prompts": st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=60), min_size=1, max_size=12),
        "shared_prefix": st.lists(st.integers(0, 1), max_size=24),
        "max_tokens": st.lists(st.integers(1, 16), min_size=12, max_size=12),
        "arrival_steps": st.lists(st.integers(0, 6), min_size=12, max_size=12),
        "aborts": st.dictionaries(st.integers(0, 11), st.integers(0, 20), max_size=3),
        "max_num_seqs": st.integers(1, 6),
        "extra_budget": st.integers(0, 40),
        "extra_blocks": st.integers(0, 40),
        "chunked": st.booleans(),
        "prefix_caching": st.booleans(),
        "num_drafts": st.sampled_from([0, 0, 1, 3]),
        "draft_seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_scheduler_invariants(w):
    prompts = [w["shared_prefix"] + p for p in w["prompts"]]
    longest = max(len(p) + m for p, m in zip(prompts, w["max_tokens"], strict=False))
    num_blocks = -(-longest // BLOCK) + w["extra_blocks"]
    config = EngineConfig(
        block_size=BLOCK,
        num_kv_blocks=num_blocks,
        max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=w["max_num_seqs"] + w["extra_budget"],
        enable_chunked_prefill=w["chunked"],
        enable_prefix_caching=w["prefix_caching"],
    ).resolve(max_position_embeddings=256, device=torch.device("cpu"))
    blocks = BlockManager(num_blocks, BLOCK, w["prefix_caching"])
    scheduler = Scheduler(config, blocks)
    model = ShadowModel(num_blocks)
    proposer = FakeProposer(random.Random(w["draft_seed"]), w["num_drafts"]) if w["num_drafts"] else None
    requests = [
        Request(str(i), p, SamplingParams(temperature=0, max_tokens=m))
        for i, (p, m) in enumerate(zip(prompts, w["max_tokens"], strict=False))
    ]
    step = 0
    while step <= 6 or scheduler.has_unfinished():
        for i, request in enumerate(requests):
            if w["arrival_steps"][i] == step:
                scheduler.add(request)
            if w["aborts"].get(i) == step and request in scheduler.running + list(scheduler.waiting):
                scheduler.finish(request, "abort")
        ready_decodes = [r for r in scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        if proposer is not None:
            propose_drafts(proposer, scheduler.running, config.max_model_len, proposer.k)
        out = scheduler.schedule()
        assert out.total_tokens <= config.max_num_batched_tokens
        assert len(scheduler.running) <= config.max_num_seqs
        # Decode-first: every decode was scheduled (or preempted), ahead of every multi-token chunk.
        assert all(r in out.requests or r in out.preempted for r in ready_decodes)
        sizes = out.num_tokens
        assert sizes == sorted(sizes, key=lambda n: n > 1)
        # Only whole, accepted blocks are ever cached: every cached key names the tokens its block holds.
        for r in scheduler.running:
            assert all(
                blocks.block_keys[b] is None
                or blocks.block_keys[b][1] == tuple(r.token_ids[i * BLOCK : (i + 1) * BLOCK])
                for i, b in enumerate(r.block_ids[: r.num_computed_tokens // BLOCK])
            )
        if not config.enable_chunked_prefill:
            assert all(
                n == r.num_tokens + len(r.draft_token_ids) - r.num_computed_tokens
                for r, n in zip(out.requests, sizes, strict=True)
            )
        scheduler.update(out, model.execute(out))
        check_blocks(blocks, scheduler.running + list(scheduler.waiting))
        step += 1
        assert step < 2000, "the workload did not finish"
    assert blocks.num_free_blocks == num_blocks and not any(blocks.ref_counts)
    for i, request in enumerate(requests):
        assert request.is_finished
        if request.finish_reason != "abort":
            assert request.output_token_ids == run_alone(prompts[i], w["max_tokens"][i])


def test_preemption_under_a_small_cache_keeps_greedy_outputs(tiny_llama):
    gen = torch.Generator().manual_seed(5)
    prompts = [
        {"prompt_token_ids": torch.randint(0, 128, (n,), generator=gen).tolist()}
        for n in (40, 70, 25, 90, 55, 8)
    ]
    params = SamplingParams(temperature=0, max_tokens=30)
    roomy = LLM(tiny_llama, max_num_seqs=6, max_num_batched_tokens=48)
    # 20 blocks of 16 tokens cannot hold all six sequences at once: some are preempted and recomputed.
    tight = LLM(tiny_llama, max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=20)
    expected = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    got = [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.stats.num_preemptions > 0
    assert roomy.engine.stats.num_preemptions == 0
    assert got == expected


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_no_block_leaks_after_finish_and_abort(tiny_llama, prefix_caching):
    llm = LLM(tiny_llama, max_num_seqs=4, max_num_batched_tokens=32, enable_prefix_caching=prefix_caching)
    engine = llm.engine
    for i in range(6):
        engine.add_request(
            str(i), list(range(1, 30 + 5 * i)), SamplingParams(temperature=0, max_tokens=20, n=1 + i % 2)
        )
    for _ in range(5):
        engine.step()
    engine.abort(["1", "4"])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not any(engine.block_manager.ref_counts)
