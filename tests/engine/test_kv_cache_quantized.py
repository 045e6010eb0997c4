"""The engine over an int8 or int4 KV cache: greedy tokens equal a plain forward that round-trips its keys
and values the same way; more blocks for the same memory; prefix caching and preemption unchanged."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.engine.config import EngineConfig
from effllm.engine.kv_cache import block_bytes, num_kv_blocks
from effllm.models.config import ModelConfig
from effllm.models.kv_round_trip import KVRoundTrip, with_kv_round_trip


def eager_greedy(model, prompt: list[int], n: int, bits: int) -> list[int]:
    """Greedy decoding by full forwards through `KVRoundTrip`: what a quantized cache should produce."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), attn=KVRoundTrip(bits))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _prompts(n=6, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 128, (int(k),), generator=gen).tolist()
        for k in torch.randint(3, 60, (n,), generator=gen)
    ]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("compiled", [True, False])
def test_greedy_output_equals_the_eager_round_trip(tiny_llama, dtype, compiled):
    bits = 8 if dtype == "int8" else 4
    prompts = _prompts()
    llm = LLM(tiny_llama, kv_cache_dtype=dtype, max_num_batched_tokens=40)  # chunked prompts
    llm.engine.runner.backend.use_compiled &= compiled
    assert llm.engine.runner.cache.kv_bits == bits
    params = SamplingParams(temperature=0, max_tokens=8)
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [eager_greedy(tiny_llama, p, 8, bits) for p in prompts]


def test_preemption_and_prefix_hits_with_int4_blocks_keep_the_tokens_and_leak_nothing(tiny_llama):
    shared = list(range(1, 40))
    prompts = [shared + [50 + i] for i in range(5)] + _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [eager_greedy(tiny_llama, p, 12, 4) for p in prompts]
    llm = LLM(tiny_llama, kv_cache_dtype="int4", num_kv_blocks=12, max_num_batched_tokens=48)
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    engine = llm.engine
    assert engine.stats.num_preemptions > 0 and engine.stats.num_prefix_cache_hit_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_quantized_cache_holds_more_blocks_in_the_same_memory():
    config = ModelConfig(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    dense = block_bytes(config, 16, torch.bfloat16)
    assert dense / block_bytes(config, 16, torch.bfloat16, 4) == 128 / 36  # codes 32 bytes + step, minimum
    assert dense / block_bytes(config, 16, torch.bfloat16, 8) == 128 / 68
    cpu = torch.device("cpu")
    blocks = {
        bits: num_kv_blocks(EngineConfig(kv_cache_memory="1MiB"), config, torch.bfloat16, cpu, kv_bits=bits)
        for bits in (None, 8, 4)
    }
    assert blocks[None] < blocks[8] < blocks[4]


def test_auto_follows_the_checkpoint_and_bad_names_are_refused(tiny_llama):
    with pytest.raises(ConfigError, match="choose auto, int8, int4"):
        EngineConfig(kv_cache_dtype="fp8")
    tiny_llama.config.quantization_config = {"kv_cache_dtype": "int4"}
    try:
        assert LLM(tiny_llama).engine.runner.cache.kv_bits == 4
        assert LLM(tiny_llama, kv_cache_dtype="int8").engine.runner.cache.kv_bits == 8
    finally:
        tiny_llama.config.quantization_config = None


def test_the_round_trip_view_scores_like_the_backend(tiny_llama):
    ids = torch.tensor([_prompts(1)[0]])
    view = with_kv_round_trip(tiny_llama, 4)
    with torch.no_grad():
        torch.testing.assert_close(view(ids), tiny_llama(ids, attn=KVRoundTrip(4)))
        torch.testing.assert_close(view.logits(view.hidden_states(ids)), view(ids))
        assert not torch.allclose(view(ids), tiny_llama(ids))
