"""Logits and greedy continuations of effllm's CausalLM equal transformers' on every supported family."""

import pytest
import torch

from effllm.models import load_model
from effllm.models.kv_cache import ContiguousKVCache
from tests.models.hf_fixtures import VARIANTS, save_hf_model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, folder)
    ours = load_model(folder, dtype=torch.float32, device="cpu")
    return hf, ours


def test_logits_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_continuation_matches_transformers(pair):
    hf, ours = pair
    torch.manual_seed(2)
    prompt = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=0)
    ids = prompt[0].tolist()
    cache = ContiguousKVCache.for_model(ours, batch_size=1, max_len=64)
    with torch.no_grad():
        logits = ours(prompt, attn=cache)
        for _ in range(24):
            ids.append(int(logits[0, -1].argmax()))
            pos = torch.tensor([[len(ids) - 1]])
            logits = ours(torch.tensor([[ids[-1]]]), positions=pos, attn=cache)
    assert ids == expected[0].tolist()
