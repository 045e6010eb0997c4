"""SkipDecode: the schedule, exactness at full depth, and each token against a dense early-exit oracle."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.engine.skip_decode import SkipSchedule


def test_schedule_falls_linearly_and_never_rises():
    schedule = SkipSchedule(2, 6, 8, num_layers=6)
    exits = [schedule.exit_layer(i) for i in range(20)]
    assert exits[0] == 6 and exits[8:] == [2] * 12
    assert all(a >= b for a, b in zip(exits, exits[1:], strict=False))
    assert exits[4] == 4  # halfway: 6 - 4 * 4 // 8
    assert SkipSchedule.parse("3,6", 6) == SkipSchedule(3, 6, 128, 6)
    with pytest.raises(ConfigError, match="MIN,MAX"):
        SkipSchedule.parse("3", 6)
    with pytest.raises(ConfigError, match="1 <= min exit <= max exit <= 6"):
        SkipSchedule.parse("4,7", 6)


def prompts(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 128, (int(torch.randint(3, 30, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]


def test_full_depth_schedule_is_plain_decoding(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.token_ids for o in LLM(tiny_llama).generate(prompts(), params, use_tqdm=False)]
    got = [
        o.token_ids for o in LLM(tiny_llama, skip_decode="2,2").generate(prompts(), params, use_tqdm=False)
    ]
    assert got == expected


@pytest.mark.parametrize("options", [{}, {"num_kv_blocks": 8, "max_num_batched_tokens": 24}])
def test_each_token_is_the_dense_models_exit_at_its_layer(tiny_llama, options):
    """Since the exit never rises, every key a token reads is what a dense forward computes: token i is the
    argmax of the dense model's layer-exit(i) logits at the last position. Batched and with preemption."""
    schedule = SkipSchedule(1, 2, 4, num_layers=2)
    params = SamplingParams(temperature=0, max_tokens=10)
    llm = LLM(tiny_llama, skip_decode="1,2,4", **options)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    for prompt, out in zip(prompts(), outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for i in range(10):
                # The first token comes from the prompt's full-depth pass; token i + 1 from generated index i.
                layer = 2 if i == 0 else schedule.exit_layer(i - 1)
                logits = tiny_llama(torch.tensor([ids]), exit_layers=[layer - 1])[0][0, -1]
                ids.append(int(logits.argmax()))
        assert out.token_ids == ids[len(prompt) :]
    if options:
        assert llm.engine.stats.num_preemptions > 0


def test_generated_blocks_are_never_prefix_cached(tiny_llama):
    """Their deep layers have no keys: a later prompt that repeats prompt + output must recompute them."""
    llm = LLM(tiny_llama, skip_decode="1,2,4", block_size=4)
    prompt = list(range(8))
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    llm.generate([prompt + first.token_ids + [1]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.engine.stats.num_prefix_cache_hit_tokens == 8  # the two prompt blocks only
