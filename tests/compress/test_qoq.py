"""QoQ (W4A8KV4): each step against its math, the kernel against the reference, the checkpoint round trip."""

import json

import pytest
import torch

from effllm.compress import W4A8, W4A8KV4, qoq, quantize_
from effllm.core.errors import InputError
from effllm.engine import LLM, SamplingParams
from effllm.kernels import cpu_quant_gemv
from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.models.qoq_linear import QoQLinear, quantize_per_token


def qoq_model(seed: int = 0, tie: bool = True) -> CausalLM:
    """A tiny llama whose linears take groups of 128 (hidden 128, MLP 256), GQA 4/2, head_dim 32."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=None,
    )
    model = CausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 and a few outlier channels, as trained models have
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
            layer.self_attn.k_proj.weight[:, :4] *= 8
        model.model.norm.weight.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def calibration():
    return torch.randint(0, 96, (4, 48), generator=torch.Generator().manual_seed(3))


def ids(n=40, seed=1):
    return torch.randint(0, 96, (2, n), generator=torch.Generator().manual_seed(seed))


def test_the_progressive_grid_stays_in_int8_and_dequantizes_to_the_reference():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen) * 3
    w[3, 7] = 40.0  # an outlier
    u, s1, s2, z = qoq.progressive(w, 128)
    assert u.min() >= 0 and u.max() <= 15 and z.min() >= 0 and z.max() <= 15
    assert s2.min() >= 1 and (s2 == s2.round()).all()
    w8 = qoq.int8_values(u, s2, z, 128)
    assert w8.min() >= -128 and w8.max() <= 127
    # The first level: round(W / s1) within the protective range, s1 = max|W| / 119.
    torch.testing.assert_close(s1, w.abs().amax(1) / 119)
    first = torch.round(w / s1[:, None])
    assert first.abs().max() <= 119
    # The second level rounds the int8 values to within half an integer step.
    assert ((w8 - first).abs() <= s2.repeat_interleave(128, 1) / 2 + 1e-6).all()
    torch.testing.assert_close(qoq.dequantize(u, s1, s2, z, 128), w8 * s1[:, None])


def test_the_module_stores_what_it_was_given_and_its_int8_weight_is_u_s2_minus_z_s2():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    u, s1, s2, z = qoq.progressive(w, 128)
    m = QoQLinear(256, 32, bias=False, group_size=128, dtype=torch.float32)
    m.set_codes(u, s1, s2, z)
    assert m.qweight.shape == (32, 128) and m.qweight.dtype == torch.uint8
    assert torch.equal(m.int8_weight().float(), qoq.int8_values(u, s2, z, 128))


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, group", [(256, 128), (576, 64), (576, 32), (320, 64), (512, 256)])
def test_the_w4a8_kernel_and_int_mm_paths_equal_the_reference(rows, dtype, k, group):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(48, k, generator=gen)
    m = QoQLinear(k, 48, bias=True, group_size=group, dtype=torch.float32)
    m.set_codes(*qoq.progressive(w, group))
    m.bias.data = torch.randn(48, generator=gen)
    m = m.to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    with torch.no_grad():
        expected = m.reference_forward(x.float()).float()
        got = m(x).float()
        if rows <= cpu_quant_gemv.MAX_ROWS[4, 8] and cpu_quant_gemv.available():
            assert m._kernel_ready(rows)  # the C kernel ran, not torch._int_mm
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 5)


@pytest.mark.parametrize("k, group", [(256, 128), (576, 32), (320, 64)])
def test_the_portable_w4a8_kernel_without_avx512_agrees(k, group):

    from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

    sig = {"gemv_w4a8": cpu_quant_gemv._SIGNATURES["gemv_w4a8"]}
    lib = load_kernel("gemv_quant.c", sig, flags=(*DEFAULT_FLAGS, "-fopenmp", "-mno-avx512f"))
    if lib is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(k)
    m = QoQLinear(k, 32, bias=False, group_size=group, dtype=torch.float32)
    m.set_codes(*qoq.progressive(torch.randn(32, k, generator=gen), group))
    x = torch.randn(3, k, generator=gen)
    y = torch.empty(3, 32)
    p = lambda t: t.data_ptr()  # noqa: E731
    lib.gemv_w4a8(
        p(x),
        p(m.qweight),
        p(m.weight_scale),
        0,
        p(m.group_scale),
        p(m.group_zero),
        p(y),
        3,
        32,
        k,
        group,
        0,
        1,
    )
    torch.testing.assert_close(y, m.reference_forward(x), rtol=1e-4, atol=1e-4)


def test_per_token_activations_round_to_127_steps():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    x8, step = quantize_per_token(x)
    assert x8.tolist() == [[64, -127, 32], [0, 0, 0]] and step[1].item() == 1.0


def test_hadamard_is_orthogonal_also_for_sizes_that_are_not_powers_of_two():
    for n in (128, 96, 384):
        q = qoq.hadamard(n)
        torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64))
        assert (q.abs() > 0).sum() == n * (n & -n)  # blocks of the largest power of two


@pytest.mark.parametrize("tie", [True, False])
def test_rotation_leaves_the_model_function_unchanged(tie):
    model = qoq_model(tie=tie).double()
    x = ids()
    with torch.no_grad():
        before = model(x)
        qoq.rotate_(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # RMSNorm and RoPE run in float32
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(128, dtype=torch.float64))


def test_smooth_attention_is_exact_before_quantization_and_flattens_the_keys():
    model = qoq_model()
    x = ids()
    from effllm.compress.calibration import LayerByLayer

    runner = LayerByLayer(model, x)
    layer = model.model.layers[0]
    kmax = qoq.key_max(layer, runner)
    lam = qoq.smooth_attention_scales(kmax)
    assert torch.equal(lam[:, :16], lam[:, 16:])  # RoPE's pairs share lambda
    with torch.no_grad():
        before = model(x)
        qoq.fold_smooth_attention(layer.self_attn, lam)
        after = model(x)
        new_max = qoq.key_max(layer, LayerByLayer(model, x))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    spread = lambda m: (m.amax(-1) / m.amin(-1).clamp_min(1e-6)).mean()  # noqa: E731
    assert spread(new_max) < spread(kmax)


@pytest.mark.parametrize("config", [W4A8(method="rtn"), W4A8KV4(), W4A8KV4(clip=True, method="rtn")])
def test_quantize_save_load_and_serve(tmp_path, calibration, config):
    model = qoq_model()
    x = ids()
    with torch.no_grad():
        dense = model(x)
    quantize_(model, config, calibration=calibration, show_progress=False)
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp.down_proj"), QoQLinear) for i in (0, 1))
    assert type(model.lm_head).__name__ == "Linear"  # skipped by default
    with torch.no_grad():
        quantized = model(x)
    err = (quantized.softmax(-1) - dense.softmax(-1)).abs().max()
    assert 0 < err < 0.2
    save_model(model, tmp_path / "q")
    section = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "effllm" and section["format"] == "qoq"
    assert section["kv_cache_dtype"] == config.kv_cache_dtype
    loaded = load_model(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), quantized)
    llm = LLM(loaded)
    assert llm.engine.runner.cache.kv_bits == (4 if config.kv_cache_dtype == "int4" else None)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert len(out[0].token_ids) == 5


def test_gptq_on_the_progressive_grid_beats_rounding_on_the_calibration_data(calibration):
    errs = {}
    for method in ("rtn", "gptq"):
        model = qoq_model()
        with torch.no_grad():
            dense = model(calibration)
        config = W4A8(method=method, rotate=False, smooth_linear=False)
        quantize_(model, config, calibration=calibration, show_progress=False)
        with torch.no_grad():
            errs[method] = (model(calibration) - dense).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_data_driven_steps_without_calibration_are_refused():
    with pytest.raises(InputError, match="calibration"):
        quantize_(qoq_model(), W4A8KV4(), show_progress=False)
    quantize_(
        qoq_model(), W4A8(method="rtn", smooth_linear=False), show_progress=False
    )  # rotation needs none
    with pytest.raises(InputError, match="group size"):
        W4A8(group_size=16).check()
