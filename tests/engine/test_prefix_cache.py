"""Prefix caching: shared prompt blocks are computed once, reused without copies, evicted least recently used."""

import torch

from effllm.engine import LLM, SamplingParams
from effllm.engine.block_manager import BlockManager
from effllm.engine.request import Request


def prompts_with_shared_prefix(prefix_len=200, suffixes=(37, 52)):
    gen = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 128, (prefix_len,), generator=gen).tolist()
    return [prefix + torch.randint(0, 128, (n,), generator=gen).tolist() for n in suffixes]


def test_second_request_computes_only_its_suffix(tiny_llama):
    first, second = prompts_with_shared_prefix()
    params = SamplingParams(temperature=0, max_tokens=10)
    cached = LLM(tiny_llama)
    out_first = cached.generate({"prompt_token_ids": first}, params, use_tqdm=False)[0]
    computed_before = cached.engine.stats.num_computed_tokens
    out_second = cached.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    computed = cached.engine.stats.num_computed_tokens - computed_before
    # The 12 full blocks (192 tokens) of the shared prefix are reused; the rest of the prompt and the
    # decodes are computed (the last output token is sampled, never computed).
    assert out_second.num_cached_tokens == 192
    assert computed == len(second) - 192 + params.max_tokens - 1
    plain = LLM(tiny_llama, enable_prefix_caching=False)
    expected = plain.generate([{"prompt_token_ids": p} for p in (first, second)], params, use_tqdm=False)
    assert [out_first.token_ids, out_second.token_ids] == [o.token_ids for o in expected]


def test_n_samples_share_the_prompt_blocks(tiny_llama):
    prompt = prompts_with_shared_prefix(prefix_len=100, suffixes=(0,))[0]
    llm = LLM(tiny_llama)
    out = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8),
        use_tqdm=False,
    )[0]
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 8 for c in out.outputs)
    # The first sample prefills 100 tokens; the other two take its 6 full blocks (96 tokens) from the cache.
    assert llm.engine.stats.num_prefix_cache_hit_tokens == 2 * 96
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # seeds seed+0, seed+1, seed+2 differ


def request(tokens):
    return Request("r", list(tokens), SamplingParams())


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_used():
    blocks = BlockManager(num_blocks=4, block_size=2)
    a = request([1, 2, 3, 4, 9])  # two full blocks and one partial
    assert blocks.allocate(a, 5)
    a.num_computed_tokens = 5
    blocks.cache_computed_blocks(a)
    a_blocks = list(a.block_ids)
    blocks.free(a)
    assert blocks.num_free_blocks == 4
    # Unkeyed blocks (the partial one, the unused one) are handed out first, then the chain's tail, its head last.
    assert list(blocks.free_queue) == [a_blocks[2], 3, a_blocks[1], a_blocks[0]]
    b = request([1, 2, 3, 4, 5, 6])
    hits = blocks.find_cached_prefix(b)
    assert hits == a_blocks[:2]
    assert blocks.allocate(b, 2, hits)
    assert b.block_ids[:2] == a_blocks[:2] and blocks.ref_counts[a_blocks[0]] == 1
    c = request([7, 8, 7, 8, 7])
    assert blocks.allocate(c, 5) is False  # one free block left, three needed: nothing is taken
    assert blocks.num_free_blocks == 1


def test_eviction_drops_the_key_of_a_reused_block():
    blocks = BlockManager(num_blocks=2, block_size=2)
    a = request([1, 2, 3])
    blocks.allocate(a, 3)
    a.num_computed_tokens = 3
    blocks.cache_computed_blocks(a)
    blocks.free(a)
    b = request([5, 6, 7, 8])
    assert blocks.allocate(b, 4)  # takes both blocks, evicting [1, 2]
    assert blocks.find_cached_prefix(request([1, 2, 3])) == []
    assert not blocks.cached
