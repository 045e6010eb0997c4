"""Prompt logprobs: each prompt token's log-probability given the tokens before it, computed in the prefill,
equal to transformers' log-softmax at the prompt positions, however the prompt is chunked."""

import pytest
import torch

from effllm.engine import LLM, SamplingParams
from tests.engine.conftest import hf_and_effllm


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf, model = hf_and_effllm("llama", tmp_path_factory.mktemp("plp"))
    return hf.eval(), model


PROMPTS = [[5, 9, 3, 77, 12, 40, 2, 99, 8, 1, 64, 33], [7, 7, 7], list(range(1, 60))]


@pytest.mark.parametrize("budget", [512, 5])  # one-shot prefill, and chunks of 5 tokens
def test_prompt_logprobs_equal_transformers_log_softmax(pair, budget):
    hf, model = pair
    llm = LLM(model, max_num_batched_tokens=budget, max_num_seqs=4)
    outs = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), use_tqdm=False
    )
    for prompt, out in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for p in range(1, len(prompt)):
            entry = out.prompt_logprobs[p]
            assert entry[prompt[p]] == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-4)
            top = ref[p - 1].topk(3)
            for token, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert entry[token] == pytest.approx(value, abs=1e-4)


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(pair):
    _, model = pair
    llm = LLM(model)
    [out] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    assert out.token_ids == [] and out.finish_reason == "length"
    assert all(set(e) == {t} for e, t in zip(out.prompt_logprobs[1:], PROMPTS[0][1:], strict=True))
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_prompt_logprobs_skip_the_prefix_cache_and_max_tokens_zero_needs_them(pair):
    _, model = pair
    llm = LLM(model, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    first = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    again = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.prompt_logprobs == first.prompt_logprobs
    with pytest.raises(Exception, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
