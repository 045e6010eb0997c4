"""The engine's contract: input checks, abort, timings, loading from a folder, configuration."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effllm.core import huge_pages
from effllm.core.errors import ConfigError, InputError
from effllm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from effllm.engine.config import CPU_MAX_NUM_BATCHED_TOKENS, CPU_OFFLINE_MAX_NUM_BATCHED_TOKENS, parse_memory
from effllm.engine.kv_cache import block_bytes
from effllm.models import save_model
from effllm.models.tokenizer_training import build_byte_level_tokenizer
from tests.engine.conftest import byte_model


def test_a_prompt_longer_than_the_context_is_rejected_and_never_scheduled(tiny_llama):
    engine = LLM(tiny_llama, max_model_len=100).engine
    with pytest.raises(InputError, match="100"):
        engine.add_request("long", list(range(100)), SamplingParams())
    assert not engine.has_unfinished_requests()
    engine.add_request("ok", list(range(99)), SamplingParams(max_tokens=50, temperature=0))
    while engine.has_unfinished_requests():
        (out,) = engine.step()
    assert out.finish_reason == "length" and len(out.token_ids) == 1  # the context is full after one token


def test_the_context_is_capped_by_what_the_cache_holds(tiny_llama):
    engine = LLM(tiny_llama, num_kv_blocks=4).engine  # 64 tokens
    assert engine.config.max_model_len == 64
    with pytest.raises(InputError, match="KV cache"):
        engine.add_request("a", list(range(64)), SamplingParams())


@pytest.mark.parametrize("prompt", [[], [128], [-1], "text without a tokenizer", 3.5, {"neither": 1}])
def test_invalid_prompts_raise_input_error(tiny_llama, prompt):
    with pytest.raises(InputError):
        LLM(tiny_llama).engine.add_request("x", prompt, SamplingParams())


def test_duplicate_request_ids_and_stop_strings_without_tokenizer_are_rejected(tiny_llama):
    engine = LLM(tiny_llama).engine
    engine.add_request("a", [1, 2, 3], SamplingParams())
    with pytest.raises(InputError, match="already"):
        engine.add_request("a", [1, 2, 3], SamplingParams())
    with pytest.raises(InputError, match="tokenizer"):
        engine.add_request("b", [1, 2, 3], SamplingParams(stop=["x"]))


def test_abort_ends_a_request_and_frees_its_blocks(tiny_llama):
    engine = LLM(tiny_llama).engine
    engine.add_request("a", list(range(1, 50)), SamplingParams(max_tokens=100))
    engine.add_request("b", list(range(1, 20)), SamplingParams(max_tokens=5, temperature=0))
    engine.step()
    engine.abort("a")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["b"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_outputs_carry_timings_and_come_back_in_prompt_order(tiny_llama):
    prompts = [{"prompt_token_ids": list(range(1, n))} for n in (90, 3, 40)]
    outs = LLM(tiny_llama).generate(
        prompts, [SamplingParams(max_tokens=k, temperature=0) for k in (2, 9, 5)], use_tqdm=False
    )
    assert [len(o.token_ids) for o in outs] == [2, 9, 5]
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
        assert o.finished and o.prompt_token_ids == list(range(1, len(o.prompt_token_ids) + 1))


def test_text_prompts_through_a_checkpoint_folder(tmp_path):
    save_model(byte_model(), tmp_path, tokenizer=build_byte_level_tokenizer())
    llm = LLM(str(tmp_path), dtype="float32", device="cpu")
    out = llm.generate(
        ["Hi there", {"prompt": "Hi there"}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert out[0].prompt == "Hi there" and out[0].prompt_token_ids == list(b"Hi there")
    assert out[0].text == out[1].text and len(out[0].text) == 8
    engine = LLMEngine.from_pretrained(tmp_path, device="cpu", max_num_seqs=4)
    assert engine.tokenizer is not None and engine.config.max_num_seqs == 4


def test_engine_config_checks_and_memory_sizes():
    assert parse_memory("2GiB") == 2 * 1024**3
    assert parse_memory("512 MiB") == 512 * 1024**2
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory(4096) == 4096
    for bad in ("lots", "2 parsecs", "-1GiB"):
        with pytest.raises(ConfigError):
            parse_memory(bad)
    with pytest.raises(ConfigError):
        EngineConfig(block_size=0)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_batched_tokens=8, max_num_seqs=16).resolve(512, torch.device("cpu"))
    unchunked = EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=64).resolve(
        512, torch.device("cpu")
    )
    assert unchunked.max_num_batched_tokens == 512  # a whole prompt must fit in one step


def test_the_offline_llm_class_takes_a_larger_cpu_token_budget_than_a_serving_engine(tiny_llama):
    assert LLM(tiny_llama).engine.config.max_num_batched_tokens == CPU_OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert LLMEngine(tiny_llama).config.max_num_batched_tokens == CPU_MAX_NUM_BATCHED_TOKENS
    assert CPU_OFFLINE_MAX_NUM_BATCHED_TOKENS > CPU_MAX_NUM_BATCHED_TOKENS
    assert (
        LLM(tiny_llama, max_num_batched_tokens=256).engine.config.max_num_batched_tokens == 256
    )  # asked: kept


def test_kv_cache_memory_sets_the_number_of_blocks(tiny_llama):
    per_block = block_bytes(tiny_llama.config, 16, torch.float32)
    engine = LLM(tiny_llama, kv_cache_memory=per_block * 10 + 5).engine
    assert engine.block_manager.num_blocks == 10
    with pytest.raises(ConfigError, match="kv-cache-memory"):
        LLM(tiny_llama, kv_cache_memory=per_block - 1)


def test_the_threads_option_sets_torchs_thread_count(tiny_llama):
    before = torch.get_num_threads()
    try:
        LLM(tiny_llama, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


_HUGE_PAGES_CHILD = """
import torch
from effllm.core import huge_pages
from effllm.engine import LLM
from effllm.models import CausalLM, ModelConfig

config = ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
for enabled in (False, True):  # off first: nothing in this process has asked for huge pages yet
    model = CausalLM(config).eval()  # a 4 MiB embedding, and KV tensors of 4 MiB a layer (1,024 blocks)
    runner = LLM(model, num_kv_blocks=1023, cpu_huge_pages=enabled).engine.runner
    tensors = (model.model.embed_tokens.weight, runner.cache.k[0], runner.cache.v[0])
    print(enabled, [huge_pages.huge_bytes(t) > 0 for t in tensors])
"""


@pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages on request here")
def test_cpu_huge_pages_back_the_weights_and_the_kv_cache():
    if huge_pages.collapse([torch.randn(4 * 2**20)]) == 0:
        pytest.skip("this kernel has no MADV_COLLAPSE or no huge page free")
    # A fresh process: glibc reuses freed memory, which earlier tests may have had made huge.
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_PAGES_CHILD], capture_output=True, text=True, check=True
    )
    off, on = out.stdout.splitlines()
    assert on == "True [True, True, True]"
    if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert off == "False [False, False, False]"  # (with `always`, Linux makes them huge unasked)
