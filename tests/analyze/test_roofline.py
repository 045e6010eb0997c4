import pytest

from effllm.analyze import analyze, load_model_config, roofline_fraction, roofline_tokens_per_s
from effllm.analyze.hardware import HARDWARE
from effllm.core.errors import ConfigError


def test_llama_7b_decode_at_batch_1_on_a100_is_memory_bound_at_weight_bytes_over_bandwidth():
    config = load_model_config("llama-7b")
    report = analyze(config, "a100-80g", "decode", batch=1, context=512)
    assert report.total.bound == "memory"
    assert all(layer.bound == "memory" for layer in report.layers)
    weights_over_bandwidth = config.num_parameters() * 2 / HARDWARE["a100-80g"].bandwidth
    assert report.total.time_s == pytest.approx(weights_over_bandwidth, rel=0.05)


def test_long_prefill_of_a_7b_model_is_compute_bound():
    report = analyze("llama-7b", "a100-80g", "prefill", batch=1, prompt=2048)
    assert report.total.bound == "compute"
    assert report.total.tokens == 2048


def test_weight_quantization_shortens_memory_bound_decode():
    fp16 = analyze("llama-7b", "a100-80g", "decode", context=128).total
    w4 = analyze("llama-7b", "a100-80g", "decode", context=128, w_bits=4).total
    assert 3.0 < fp16.time_s / w4.time_s < 4.0  # weights shrink 4x, activations and KV do not


def test_int8_operands_use_the_int8_peak_and_missing_formats_fall_back_to_wider_ones():
    a100, h100 = HARDWARE["a100-80g"], HARDWARE["h100-sxm"]
    assert a100.peak_for_bits(8) == 624e12
    assert a100.peak_for_bits(16) == 312e12
    assert h100.peak_for_bits(4) == h100.peak_flops["int8"]  # no int4 tensor cores on Hopper
    assert HARDWARE["m2-ultra"].peak_for_bits(16) == HARDWARE["m2-ultra"].peak_flops["fp32"]
    w8a8 = analyze("llama-7b", "a100-80g", "prefill", prompt=2048, w_bits=8, a_bits=8)
    assert {layer.peak_flops for layer in w8a8.layers if layer.cost.kind == "linear"} == {624e12}


def test_generate_is_prefill_plus_every_decode_step():
    args = dict(model="smollm-135m", hardware="a6000", batch=2)
    gen = analyze(phase="generate", prompt=16, output=5, **args)
    prefill = analyze(phase="prefill", prompt=16, **args).total
    decodes = [analyze(phase="decode", context=c, **args).total for c in range(16, 20)]
    assert gen.total.time_s == pytest.approx(prefill.time_s + sum(d.time_s for d in decodes))
    assert gen.total.ops == pytest.approx(prefill.ops + sum(d.ops for d in decodes))
    assert gen.parts["decode"].tokens == 2 * 4 and gen.total.tokens == 2 * 5
    assert set(gen.to_dict()) >= {"layers", "total", "prefill", "decode"}


def test_report_json_has_layers_and_total():
    data = analyze("qwen2.5-0.5b", "h100-sxm", "decode", batch=4, context=64).to_dict()
    assert {"ops", "bytes", "time_s", "bound"} <= set(data["total"])
    assert data["layers"][0]["name"] == "embed_tokens"
    assert sum(layer["ops"] * layer["count"] for layer in data["layers"]) == pytest.approx(
        data["total"]["ops"]
    )


def test_roofline_fraction_is_measured_over_roofline_tokens_per_s():
    ideal = roofline_tokens_per_s("llama-7b", "a100-80g", "decode", batch=1, tokens=512)
    assert ideal == pytest.approx(1 / analyze("llama-7b", "a100-80g", "decode", context=512).total.time_s)
    assert roofline_fraction("llama-7b", "a100-80g", "decode", 1, 512, ideal / 2) == pytest.approx(0.5)
    prefill = roofline_tokens_per_s("llama-7b", "a100-80g", "prefill", batch=2, tokens=256)
    assert roofline_fraction("llama-7b", "a100-80g", "prefill", 2, 256, prefill) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(phase="decode"),
        dict(phase="prefill"),
        dict(phase="generate", prompt=4),
        dict(phase="decode", context=4, batch=0),
        dict(phase="warmup", context=4),
    ],
)
def test_bad_phase_arguments_raise_config_errors(kwargs):
    with pytest.raises(ConfigError):
        analyze("galore-60m", "a100-80g", **kwargs)


def test_two_four_sparsity_halves_linear_compute_and_stores_weights_with_two_bit_indices():
    dense = analyze("llama-7b", "a100-80g", "prefill", prompt=2048)
    sparse = analyze("llama-7b", "a100-80g", "prefill", prompt=2048, sparsity="2:4")
    by_name = {layer.cost.name: layer for layer in dense.layers}
    for layer in sparse.layers:
        before = by_name[layer.cost.name]
        if layer.cost.name in ("q_proj", "gate_proj", "down_proj"):
            assert layer.cost.ops == pytest.approx(before.cost.ops / 2)
            # fp16 values of the kept half, each with a 2-bit position: 18 bits per kept, 9 per weight
            assert layer.cost.load_weight == pytest.approx(before.cost.load_weight * 9 / 16)
        elif layer.cost.name in ("lm_head", "attention", "embed_tokens"):
            assert layer.cost == before.cost  # pruning leaves these dense
    assert dense.total.bound == "compute" and 1.6 < dense.total.time_s / sparse.total.time_s < 2.0
    decode = analyze("llama-7b", "a100-80g", "decode", context=128).total
    sparse_decode = analyze("llama-7b", "a100-80g", "decode", context=128, sparsity="2:4").total
    assert 1.5 < decode.time_s / sparse_decode.time_s < 16 / 9  # weight bytes x 9/16, the rest unchanged
    four_eight = analyze("llama-7b", "a100-80g", "decode", context=128, sparsity="4:8")
    assert four_eight.to_dict()["sparsity"] == "4:8"
    assert four_eight.total.bytes > sparse_decode.bytes  # 3-bit indices at 4:8


@pytest.mark.parametrize("spec", ["0.5", "4:4", "2-4", "0:4"])
def test_sparsity_other_than_n_of_m_is_refused(spec):
    with pytest.raises(ConfigError, match="N:M|0 < N < M"):
        analyze("llama-7b", "a100-80g", "decode", context=8, sparsity=spec)
