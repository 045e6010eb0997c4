"""`LLM.generate` on many prompts at once gives, token for token, transformers' greedy output per prompt."""

import pytest
import torch

from effllm.engine import LLM, SamplingParams
from tests.engine.conftest import hf_and_effllm

LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 64, 100, 150, 255, 300]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "qwen2-untied", "qwen2-sliding", "mistral-sliding"])
def pair(request, tmp_path_factory):
    return hf_and_effllm(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def expected(pair, prompts):
    hf, _ = pair
    out = []
    with torch.no_grad():
        for ids in prompts:
            # An explicit attention mask: otherwise prompt tokens equal to pad_token_id are masked out.
            seq = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(seq[0, len(ids) :].tolist())
    return out


# A budget of 64 tokens splits long prompts into chunks that share steps with other requests' decodes.
@pytest.mark.parametrize("budget", [64, None])
def test_batched_greedy_matches_transformers_per_prompt(pair, prompts, expected, budget):
    _, model = pair
    llm = LLM(model, max_num_batched_tokens=budget, max_num_seqs=16)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
