"""The fused CPU decode step (`engine/cpu_decode_step.py`, `kernels/cpu/decode_step.c`) against the model's
PyTorch forward: the same log-probabilities step after step (GQA, biases, sliding windows, float32 and
bfloat16), the portable build equal to the AVX-512 one, and the PyTorch path whenever the model is not what
the kernel was set up for; palettized models through the same step."""

import copy
import functools

import pytest
import torch

from effllm.engine import LLM, SamplingParams
from effllm.engine.cpu_decode_step import CPUDecodeStep
from effllm.kernels import cpu_decode_step as kernel
from tests.engine.conftest import hf_and_effllm

pytestmark = pytest.mark.skipif(not kernel.decode_step_available(), reason="no C compiler")


@pytest.fixture(scope="module", params=["llama", "qwen2-untied", "mistral-sliding"])
def model(request, tmp_path_factory):
    return hf_and_effllm(request.param, tmp_path_factory.mktemp(request.param))[1]


def prompts(n=6, vocab=128):
    gen = torch.Generator().manual_seed(0)
    return [
        {"prompt_token_ids": torch.randint(0, vocab, (3 + 17 * i,), generator=gen).tolist()} for i in range(n)
    ]


def run(model, fused: int, dtype: str, calls: list | None = None, vocab: int = 128):
    model = copy.deepcopy(model)  # the engine converts and fuses the model it is given
    llm = LLM(model, dtype=dtype, cpu_fused_decode=fused, max_num_seqs=8, enable_prefix_caching=False)
    step = llm.engine.runner.fused_decode
    assert (step is not None) == bool(fused)
    if calls is not None and step is not None:
        inner = step.run
        step.run = lambda layout: calls.append(layout.num_tokens) or inner(layout)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=3)
    return llm.generate(prompts(vocab=vocab), params, use_tqdm=False)


def logprobs(outs):
    return [[lp[t] for t, lp in zip(o.token_ids, o.outputs[0].logprobs, strict=True)] for o in outs]


def assert_agree(fused, plain, dtype: str, tolerance: float = 1e-4):
    """float32: the same tokens and log-probabilities to `tolerance`; bfloat16 rounds at other points: the
    first two tokens agree and the first log-probabilities stay close."""
    if dtype == "float32":
        assert [o.token_ids for o in fused] == [o.token_ids for o in plain]
        torch.testing.assert_close(logprobs(fused), logprobs(plain), rtol=tolerance, atol=tolerance)
    else:
        assert [o.token_ids[:2] for o in fused] == [o.token_ids[:2] for o in plain]
        first = [lp[0] for lp in logprobs(fused)], [lp[0] for lp in logprobs(plain)]
        torch.testing.assert_close(*first, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_steps_give_the_pytorch_forwards_log_probabilities(model, dtype):
    calls = []
    fused, plain = run(model, 8, dtype, calls), run(model, 0, dtype)
    assert calls and max(calls) > 1  # decode steps of several requests took the fused path
    assert_agree(fused, plain, dtype)


def test_the_portable_build_equals_the_default_one():
    lib = kernel.load_library(("-mno-avx512f",))
    if lib is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(1)
    hidden, heads, kv, d, inter, layers, bs = 64, 4, 2, 16, 96, 2, 4

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.1).bfloat16()

    results = []
    for library in (None, lib):
        k = [torch.zeros(8, bs, kv, d, dtype=torch.bfloat16) for _ in range(layers)]
        v = [torch.zeros(8, bs, kv, d, dtype=torch.bfloat16) for _ in range(layers)]
        gen.manual_seed(2)
        pointers = kernel.LayerPointers(
            w_qkv=[w(heads * d + 2 * kv * d, hidden) for _ in range(layers)],
            b_qkv=[None] * layers,
            w_o=[w(hidden, heads * d) for _ in range(layers)],
            b_o=[None] * layers,
            w_gu=[w(2 * inter, hidden) for _ in range(layers)],
            b_gu=[torch.randn(2 * inter, generator=gen) for _ in range(layers)],
            w_down=[w(hidden, inter) for _ in range(layers)],
            b_down=[None] * layers,
            norm_in=[torch.rand(hidden, generator=gen) + 0.5 for _ in range(layers)],
            norm_post=[torch.rand(hidden, generator=gen) + 0.5 for _ in range(layers)],
            k_cache=k,
            v_cache=v,
        )
        x = torch.randn(3, hidden, generator=gen)
        pos = torch.tensor([[0, 5, 9]])
        freqs = pos[..., None].float() * (1.0 / 10000 ** (torch.arange(0, d, 2) / d))
        emb = torch.cat([freqs, freqs], -1)[0]
        kernel.decode_step(
            x,
            emb.cos().contiguous(),
            emb.sin().contiguous(),
            pointers,
            slots=torch.tensor([0, 5 + bs, 9 + 4 * bs]),
            block_tables=torch.tensor([[0, 0, 0], [0, 1, 0], [2, 3, 4]]),
            lens=torch.tensor([1, 6, 10]),
            windows=torch.tensor([-1, 3]),
            num_heads=heads,
            intermediate_size=inter,
            eps=1e-5,
            scale=d**-0.5,
            threads=2,
            library=library,
        )
        results.append((x, torch.stack(k).float()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-2, atol=2e-2)


def test_models_the_kernel_does_not_cover_take_the_pytorch_path(model):
    from effllm.compress.schemes import W8A16, quantize_

    model = copy.deepcopy(model)
    llm = LLM(model, dtype="float32", enable_prefix_caching=False)
    step = llm.engine.runner.fused_decode
    layer = model.model.layers[0]
    handle = layer.mlp.down_proj.register_forward_hook(lambda *a: None)  # a hook wants the module called
    try:
        assert step._tensors() is None
        (out,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert len(out.token_ids) == 3
    finally:
        handle.remove()
    assert step._tensors() is not None
    quantized = LLM(copy.deepcopy(model), dtype="float32")
    quantize_(quantized.engine.model, W8A16())
    assert CPUDecodeStep.build(quantized.engine.model, quantized.engine.runner.cache) is None
    assert LLM(model, dtype="float32", kv_cache_dtype="int8").engine.runner.fused_decode is None


def test_replaced_weights_are_read_after_the_replacement(model):
    llm = LLM(copy.deepcopy(model), dtype="float32", enable_prefix_caching=False, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=6)
    before = [o.token_ids for o in llm.generate(prompts(4), params, use_tqdm=False)]
    down = llm.engine.model.model.layers[-1].mlp.down_proj
    original = down.weight.data
    down.weight.data = original * 3  # a new tensor: the kernel must not read the old one
    try:
        fused = [o.token_ids for o in llm.generate(prompts(4), params, use_tqdm=False)]
        reference = LLM(llm.engine.model, cpu_fused_decode=0, enable_prefix_caching=False, max_num_seqs=4)
        assert fused == [o.token_ids for o in reference.generate(prompts(4), params, use_tqdm=False)]
        assert fused != before
    finally:
        down.weight.data = original


def palettized(model, bits=3):
    from effllm.compress.palettize import palettize_

    model = copy.deepcopy(model)
    if any(m.in_features % 32 for m in model.modules() if isinstance(m, torch.nn.Linear)):
        pytest.skip("a linear's inputs are not a multiple of 32")
    palettize_(model, bits, show_progress=False)
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_palettized_models_take_the_fused_step_with_the_same_log_probabilities(model, dtype):
    model = palettized(model)
    calls = []
    fused, plain = run(model, 8, dtype, calls), run(model, 0, dtype)
    assert calls and max(calls) > 1
    assert_agree(fused, plain, dtype)


@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-gfni", "-mno-avx512vbmi")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_portable_builds_run_palettized_steps_alike(model, flags, dtype, monkeypatch):
    """The fused step built as a CPU without AVX-512, or without VBMI/GFNI, compiles it."""
    from effllm.engine import cpu_decode_step as engine_step
    from effllm.kernels.cpu.build import cpu_features

    if "-mno-gfni" in flags and "avx512bw" not in cpu_features():
        pytest.skip("no AVX-512 here")
    lib = kernel.load_library(flags)
    if lib is None:
        pytest.skip("no C compiler")
    llm = LLM(palettized(model), dtype=dtype, enable_prefix_caching=False, max_num_seqs=4)
    assert llm.engine.runner.fused_decode is not None
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2)
    default = llm.generate(prompts(3), params, use_tqdm=False)
    monkeypatch.setattr(engine_step, "decode_step", functools.partial(kernel.decode_step, library=lib))
    portable = llm.generate(prompts(3), params, use_tqdm=False)
    assert [o.token_ids[:2] for o in portable] == [o.token_ids[:2] for o in default]
    tolerance = 0.05 if dtype == "bfloat16" else 1e-4
    first = [lp[0] for lp in logprobs(portable)], [lp[0] for lp in logprobs(default)]
    torch.testing.assert_close(*first, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not kernel.decode_step_dpbf16(), reason="the 4-bit fused path needs AVX-512 BF16")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_w4a16_models_take_the_fused_step_with_the_same_log_probabilities(dtype, group_size):
    from effllm.compress import W4A16, quantize_
    from tests.compress.conftest import quant_model

    model = quant_model()  # every linear's inputs a multiple of 64, as the 4-bit path needs
    quantize_(model, W4A16(group_size=group_size), show_progress=False)
    calls = []
    fused, plain = run(model, 8, dtype, calls, vocab=96), run(model, 0, dtype, vocab=96)
    assert calls and max(calls) > 1
    # both paths round the 4-bit products' inputs to bfloat16, at the same points
    assert_agree(fused, plain, dtype, 1e-3)


@pytest.mark.skipif(not kernel.decode_step_dpbf16(), reason="the 4-bit fused path needs AVX-512 BF16")
@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w8a8"])
def test_the_portable_build_runs_quantized_steps_alike(scheme, monkeypatch):
    """The quantized products' portable loops (a CPU without AVX-512 compiles them) against the AVX-512 ones."""
    from effllm.compress import W4A16, W8A8, W8A16, quantize_
    from effllm.engine import cpu_decode_step as engine_step
    from tests.compress.conftest import quant_model

    lib = kernel.load_library(("-mno-avx512f",))
    if lib is None:
        pytest.skip("no C compiler")
    model = quant_model()
    config = {"w4a16": W4A16(group_size=32), "w8a16": W8A16(), "w8a8": W8A8()}[scheme]
    quantize_(model, config, show_progress=False)
    llm = LLM(model, dtype="float32", enable_prefix_caching=False, max_num_seqs=4)
    assert llm.engine.runner.fused_decode is not None
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2)
    default = llm.generate(prompts(3, vocab=96), params, use_tqdm=False)
    monkeypatch.setattr(engine_step, "decode_step", functools.partial(kernel.decode_step, library=lib))
    portable = llm.generate(prompts(3, vocab=96), params, use_tqdm=False)
    assert [o.token_ids[:2] for o in portable] == [o.token_ids[:2] for o in default]
    first = [lp[0] for lp in logprobs(portable)], [lp[0] for lp in logprobs(default)]
    torch.testing.assert_close(*first, rtol=0.02, atol=0.02)  # float32 activations against bfloat16 ones


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_8_bit_models_take_the_fused_step_with_the_same_log_probabilities(scheme, dtype):
    from effllm.compress import W8A8, W8A16, quantize_
    from tests.compress.conftest import quant_model

    model = quant_model()
    quantize_(model, W8A16() if scheme == "w8a16" else W8A8(), show_progress=False)
    calls = []
    fused, plain = run(model, 8, dtype, calls, vocab=96), run(model, 0, dtype, vocab=96)
    assert calls and max(calls) > 1
    # the same products (W8A8: the same per-row activation codes) in both paths
    assert_agree(fused, plain, dtype, 1e-3)


def test_more_than_16_rows_on_amx_equal_the_same_rows_in_smaller_steps():
    """Dense bfloat16 steps of 17-64 rows multiply on AMX tiles (matvec_amx: the weights as tiles straight
    from their rows); the same queries in steps of at most 16 rows take the vdpbf16ps dot products. Both
    round the inputs to bfloat16 and sum in float32: the same result up to the order of the sums."""
    from effllm.kernels.cpu.build import cpu_features

    if not {"amx_tile", "amx_bf16"} <= cpu_features():
        pytest.skip("no AMX on this CPU")
    assert kernel.decode_step_amx()
    gen = torch.Generator().manual_seed(3)
    hidden, heads, kv, d, inter, layers, bs, rows = 128, 4, 2, 32, 160, 2, 4, 52  # 4 tiles, the last partial

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.1).bfloat16()

    weights = dict(
        w_qkv=[w(heads * d + 2 * kv * d, hidden) for _ in range(layers)],
        b_qkv=[torch.randn(heads * d + 2 * kv * d, generator=gen) for _ in range(layers)],
        w_o=[w(hidden, heads * d) for _ in range(layers)],
        b_o=[None] * layers,
        w_gu=[w(2 * inter, hidden) for _ in range(layers)],
        b_gu=[None] * layers,
        w_down=[w(hidden, inter) for _ in range(layers)],
        b_down=[torch.randn(hidden, generator=gen) for _ in range(layers)],
        norm_in=[torch.rand(hidden, generator=gen) + 0.5 for _ in range(layers)],
        norm_post=[torch.rand(hidden, generator=gen) + 0.5 for _ in range(layers)],
    )
    x0 = torch.randn(rows, hidden, generator=gen)
    lens = torch.randint(1, 3 * bs, (rows,), generator=gen)
    pos = lens - 1
    freqs = pos[:, None].float() * (1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    tables = torch.arange(rows * 3).view(rows, 3)  # three blocks of its own per row
    slots = tables[torch.arange(rows), pos // bs] * bs + pos % bs
    history = torch.randn(rows * 3, bs, kv, d, generator=gen).bfloat16()  # earlier keys and values

    results = []
    for step in (rows, 16):  # one step of 52 rows (AMX); steps of 16, 16, 16 and 4 rows (dot products)
        k = [history.clone() for _ in range(layers)]
        v = [history.flip(0).clone() for _ in range(layers)]
        pointers = kernel.LayerPointers(**weights, k_cache=k, v_cache=v)
        x = x0.clone()
        for r0 in range(0, rows, step):
            part = slice(r0, r0 + step)
            xs = x[part].contiguous()
            kernel.decode_step(
                xs,
                cos[part].contiguous(),
                sin[part].contiguous(),
                pointers,
                slots=slots[part],
                block_tables=tables[part].contiguous(),
                lens=lens[part].contiguous(),
                windows=torch.tensor([-1, 5]),
                num_heads=heads,
                intermediate_size=inter,
                eps=1e-5,
                scale=d**-0.5,
                threads=2,
            )
            x[part] = xs
        results.append((x, torch.stack(k).float(), torch.stack(v).float()))
    assert not torch.equal(results[0][0], x0)
    for got, expected in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
