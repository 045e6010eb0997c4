"""Attention backends come from one table keyed by EngineConfig.attention_backend."""

import pytest

from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.engine.attention_backend import BACKENDS, PagedAttention


def test_auto_and_paged_pick_the_paged_backend_on_cpu(tiny_llama):
    for name in ("auto", "paged"):
        assert type(LLM(tiny_llama, attention_backend=name).engine.runner.backend) is BACKENDS["paged"]
    assert BACKENDS["paged"] is PagedAttention


def test_unknown_or_unavailable_backends_are_refused_with_the_choices(tiny_llama):
    with pytest.raises(ConfigError, match="choose auto or one of paged, triton"):
        LLM(tiny_llama, attention_backend="flash")
    with pytest.raises(ConfigError, match="needs CUDA"):
        LLM(tiny_llama, attention_backend="triton")


def test_a_backend_registered_in_the_table_is_used(tiny_llama, monkeypatch):
    calls = []

    class Counting(PagedAttention):
        def prepare(self, layout):
            calls.append(layout.num_tokens)
            super().prepare(layout)

    monkeypatch.setitem(BACKENDS, "counting", Counting)
    params = SamplingParams(temperature=0, max_tokens=4)
    expected = LLM(tiny_llama).generate([[1, 2, 3]], params, use_tqdm=False)[0].token_ids
    got = (
        LLM(tiny_llama, attention_backend="counting")
        .generate([[1, 2, 3]], params, use_tqdm=False)[0]
        .token_ids
    )
    assert got == expected and calls == [3, 1, 1, 1]
