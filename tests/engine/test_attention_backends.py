"""Attention backends come from one table keyed by EngineConfig.attention_backend."""

import os

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.engine.attention_backend import BACKENDS, PagedAttention
from effllm.kernels import paged_attention


def test_auto_and_paged_pick_the_paged_backend_on_cpu(tiny_llama):
    for name in ("auto", "paged"):
        assert type(LLM(tiny_llama, attention_backend=name).engine.runner.backend) is BACKENDS["paged"]
    assert BACKENDS["paged"] is PagedAttention


def test_unknown_or_unavailable_backends_are_refused_with_the_choices(tiny_llama, monkeypatch):
    with pytest.raises(ConfigError, match="choose auto or one of paged, triton"):
        LLM(tiny_llama, attention_backend="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="needs CUDA"):
        LLM(tiny_llama, attention_backend="triton")


@pytest.mark.skipif(
    paged_attention.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and its interpreter (TRITON_INTERPRET=1)",
)
def test_the_triton_backend_under_the_interpreter_gives_the_paged_backends_tokens(tiny_llama):
    """The CUDA engine's attention (one launch per layer for the whole mixed step), run on CPU tensors."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = [o.token_ids for o in LLM(tiny_llama).generate(prompts, params, use_tqdm=False)]
    llm = LLM(tiny_llama, attention_backend="triton", max_num_batched_tokens=32)
    assert type(llm.engine.runner.backend).__name__ == "TritonPagedAttention"
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


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
