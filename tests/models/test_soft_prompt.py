"""Soft prompts: virtual token ids past the vocabulary look up the prompt vectors; an untrained prompt
(the first n embedding rows) is the same as prepending tokens 0 .. n-1, in the model, the evaluations and
the engine, whose prefix cache computes the prompt's KV once."""

import copy

import pytest
import torch

from effllm.core.errors import CheckpointError, ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.eval.loglikelihood import token_logprobs
from effllm.models.soft_prompt import (
    PromptEmbedding,
    add_soft_prompt,
    context_length,
    initial_prompt,
    load_soft_prompt,
    load_soft_prompt_into,
    prompted_logits,
    save_soft_prompt,
    virtual_ids,
)
from tests.engine.conftest import byte_model

N = 20


def prompted(model, n=N):
    model = copy.deepcopy(model)
    add_soft_prompt(model, initial_prompt(model, n))
    return model


def test_virtual_ids_read_the_prompt_and_real_ids_the_table():
    model = byte_model()
    weight = model.model.embed_tokens.weight
    table = weight.detach().clone()
    prompt = torch.randn(3, model.config.hidden_size)
    ids = add_soft_prompt(model, prompt)
    assert ids == [259, 260, 261]
    embedding = model.model.embed_tokens
    assert isinstance(embedding, PromptEmbedding) and embedding.weight is weight  # a tied head stays tied
    out = embedding(torch.tensor([[5, 259, 261, 0]]))
    torch.testing.assert_close(out[0], torch.stack([table[5], prompt[0], prompt[2], table[0]]))
    assert model(torch.tensor([[1, 259]])).shape[-1] == 259  # the head never produces a virtual id
    assert context_length(model) == 512 - 3
    add_soft_prompt(model, prompt[:2])  # a new prompt replaces the old one
    assert virtual_ids(model) == [259, 260]
    with pytest.raises(ConfigError, match=r"\[n, 64\]"):
        add_soft_prompt(model, torch.randn(2, 32))


def test_untrained_prompt_equals_prepending_the_first_tokens():
    model = byte_model()
    soft = prompted(model)
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    lead = torch.arange(N).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(prompted_logits(soft, ids), model(torch.cat([lead, ids], 1))[:, N:])
        got, _ = token_logprobs(soft, ids, [0, 1], [3, 11], [7, 9])
        logits = torch.log_softmax(model(torch.cat([lead, ids], 1)).float(), -1)
    torch.testing.assert_close(got, torch.stack([logits[0, N + 3, 7], logits[1, N + 11, 9]]))


def test_files_round_trip_and_are_checked(tmp_path):
    model = prompted(byte_model(), 4)
    with torch.no_grad():
        model.model.embed_tokens.prompt.add_(1.0)
    save_soft_prompt(model, tmp_path / "p", base_model="base")
    prompt, config = load_soft_prompt(tmp_path / "p")
    torch.testing.assert_close(prompt, model.model.embed_tokens.prompt.detach())
    assert config["num_virtual_tokens"] == 4 and config["vocab_size"] == 259
    other = byte_model()
    assert load_soft_prompt_into(other, tmp_path / "p") == [259, 260, 261, 262]
    with pytest.raises(CheckpointError, match="soft_prompt.safetensors"):
        load_soft_prompt(tmp_path)
    other.config.vocab_size = 300
    with pytest.raises(ConfigError, match="vocab_size 259"):
        load_soft_prompt_into(other, tmp_path / "p")


def test_engine_with_an_untrained_prompt_equals_prepending_its_tokens(tmp_path):
    model = byte_model()
    save_soft_prompt(prompted(model), tmp_path / "prompt")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(32, 127, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12)
    soft = LLM(copy.deepcopy(model), soft_prompt=str(tmp_path / "prompt"), block_size=8)
    outs = soft.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = LLM(copy.deepcopy(model), block_size=8)
    expected = plain.generate(
        [{"prompt_token_ids": list(range(N)) + p} for p in prompts], params, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert [o.prompt_token_ids for o in outs] == prompts  # the virtual ids are not reported
    # A repetition penalty looks at the real prompt only (virtual ids are not in the logits' range). The
    # soft prompt's two full blocks (16 of its 20 tokens) were computed before: this request reuses them.
    hits = soft.engine.stats.num_prefix_cache_hit_tokens
    penalised = soft.generate(
        {"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3)
    )
    assert len(penalised[0].outputs[0].token_ids) == 4
    assert soft.engine.stats.num_prefix_cache_hit_tokens - hits >= 16


def test_engine_refuses_what_a_soft_prompt_cannot_serve(tmp_path):
    model = byte_model()
    save_soft_prompt(prompted(model), tmp_path / "prompt")
    with pytest.raises(ConfigError, match="ngram"):
        LLM(copy.deepcopy(model), soft_prompt=str(tmp_path / "prompt"), speculative_method="ngram")
    soft = LLM(copy.deepcopy(model), soft_prompt=str(tmp_path / "prompt"), max_model_len=40)
    from effllm.core.errors import InputError

    with pytest.raises(InputError, match="soft prompt's 20"):
        soft.generate({"prompt_token_ids": [40] * 25}, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(InputError, match="prompt_logprobs"):
        soft.generate({"prompt_token_ids": [40] * 5}, SamplingParams(prompt_logprobs=1), use_tqdm=False)
