import pytest

from effllm.analyze.hardware import Hardware
from effllm.analyze.layer_costs import Bits, attended_keys, kv_span, step_costs
from effllm.analyze.roofline import layer_roofline
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

# hidden 64, 4 query heads and 2 KV heads of 16, MLP 128; 16-bit everything (2 bytes an element).
TOY = ModelConfig(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _op(costs, name):
    return next(c for c in costs if c.name == name)


def test_linear_prefill_ops_and_bytes_match_hand_computation():
    costs = step_costs(TOY, batch=2, new=8, cached=0, bits=Bits())  # 16 tokens
    q = _op(costs, "q_proj")
    assert q.ops == 2 * 64 * 64 * 16 == 131072
    assert q.load_weight == 64 * 64 * 2 == 8192
    assert q.load_act == 64 * 16 * 2 == 2048
    assert q.store_act == 64 * 16 * 2 == 2048
    assert q.load_kv == q.store_kv == 0
    assert q.count == 2
    k = _op(costs, "k_proj")  # 2 KV heads x 16 = 32 outputs, written to the KV cache
    assert k.ops == 2 * 64 * 32 * 16 == 65536
    assert k.load_weight == 64 * 32 * 2 == 4096
    assert k.store_act == 0
    assert k.store_kv == 32 * 16 * 2 == 1024


def test_linear_decode_ops_and_bytes_match_hand_computation():
    costs = step_costs(TOY, batch=2, new=1, cached=10, bits=Bits())  # 2 tokens
    q = _op(costs, "q_proj")
    assert q.ops == 2 * 64 * 64 * 2 == 16384
    assert q.load_weight == 8192  # the whole weight for only two tokens: arithmetic intensity ~1
    assert q.load_act == q.store_act == 64 * 2 * 2 == 256
    head = _op(costs, "lm_head")
    assert head.ops == 2 * 64 * 100 * 2  # 2 ops per multiply-add (LLM-Viewer forgot the 2)


def test_attention_prefill_ops_and_bytes_match_hand_computation():
    attn = _op(step_costs(TOY, batch=2, new=8, cached=0, bits=Bits()), "attention")
    # causal: query j sees j+1 keys, 1+2+...+8 = 36 scores per (sequence, head); 2 x 4 x 36 = 288
    # per score: q.k 2d, p.v 2d, softmax 5 -> 4 x 16 + 5 = 69 ops
    assert attn.ops == 69 * 288 == 19872
    assert attn.load_act == 2 * 8 * 4 * 16 * 2 == 2048  # q, every query head
    assert attn.store_act == 2048  # o
    assert attn.load_kv == 2 * (2 * 8 * 2 * 16 * 2) == 2048  # K and V of 8 positions, 2 KV heads
    assert attn.load_weight == attn.store_kv == 0


def test_attention_decode_ops_and_bytes_match_hand_computation():
    attn = _op(step_costs(TOY, batch=2, new=1, cached=10, bits=Bits(kv=8)), "attention")
    # the new token attends the 10 cached keys and itself
    assert attn.ops == 69 * (2 * 4 * 11) == 6072
    assert attn.load_act == attn.store_act == 2 * 4 * 16 * 2 == 256
    assert attn.load_kv == 2 * (2 * 11 * 2 * 16 * 1) == 1408  # 8-bit KV: 1 byte an element
    assert attn.operand_bits == 16


def test_unfused_attention_moves_the_score_matrix_through_memory():
    costs = step_costs(TOY, batch=1, new=8, cached=0, bits=Bits(), fused_attention=False)
    qk, softmax, sv = (_op(costs, f"attention.{n}") for n in ("qk_matmul", "softmax", "sv_matmul"))
    scores = 4 * 8 * 8  # the full rectangle, mask included
    assert qk.ops == sv.ops == 2 * 16 * scores
    assert softmax.ops == 5 * scores
    assert qk.store_act == softmax.load_act == softmax.store_act == sv.load_act == scores * 2
    assert qk.load_kv == sv.load_kv == 8 * 2 * 16 * 2


def test_sliding_window_caps_keys_and_groups_layers():
    assert attended_keys(cached=0, new=8, window=None) == 36
    assert attended_keys(cached=0, new=8, window=3) == 1 + 2 + 3 * 6
    assert attended_keys(cached=100, new=1, window=3) == 3
    assert attended_keys(cached=1, new=4, window=3) == 2 + 3 + 3 + 3
    assert kv_span(cached=100, new=1, window=3) == 3
    assert kv_span(cached=100, new=1, window=None) == 101
    config = ModelConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        sliding_windows=[None, 4, 4],
    )
    names = {c.name: c.count for c in step_costs(config, 1, 1, 50, Bits())}
    assert names["attention[full]"] == 1 and names["attention[4]"] == 2


def test_bits_scale_weight_and_kv_bytes():
    fp16 = _op(step_costs(TOY, 1, 1, 10, Bits()), "q_proj")
    w4 = _op(step_costs(TOY, 1, 1, 10, Bits(w=4)), "q_proj")
    assert w4.load_weight == fp16.load_weight / 4
    assert w4.operand_bits == 16  # weight-only quantization still multiplies in 16 bits
    assert _op(step_costs(TOY, 1, 1, 10, Bits(w=8, a=8)), "q_proj").operand_bits == 8
    with pytest.raises(ConfigError):
        Bits(w=0)


def test_layer_roofline_takes_the_larger_of_compute_and_memory_time():
    toy_hw = Hardware("toy", bandwidth=1e9, peak_flops={"bf16": 1e12})
    q = _op(step_costs(TOY, 2, 8, 0, Bits()), "q_proj")
    r = layer_roofline(q, toy_hw)
    assert r.compute_time_s == pytest.approx(131072 / 1e12)
    assert r.memory_time_s == pytest.approx(12288 / 1e9)
    assert r.time_s == r.memory_time_s and r.bound == "memory"
    fast_memory = layer_roofline(q, Hardware("toy", bandwidth=1e15, peak_flops={"bf16": 1e12}))
    assert fast_memory.bound == "compute" and fast_memory.time_s == pytest.approx(131072 / 1e12)
