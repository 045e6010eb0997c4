"""The CPU GEMV kernel against F.linear (its reference), and the DecodeLinear swap that uses it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effllm.kernels import cpu_gemv
from effllm.models.decode_linear import DecodeLinear, use_decode_linears

needs_kernel = pytest.mark.skipif(not cpu_gemv.gemv_available(), reason="no C compiler")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 192, 576), (2, 1536, 576), (1, 37, 129), (8, 64, 1000), (5, 96, 100), (7, 48, 64)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_f_linear(dtype, rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows * n + k)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(1, rows, k, generator=gen).to(dtype)
    with torch.inference_mode():
        most = cpu_gemv.MAX_ROWS[dtype]
        if dtype == torch.bfloat16 and cpu_gemv.bf16_native():
            most = cpu_gemv.MAX_ROWS_BF16_NATIVE  # bfloat16 activations: the AVX-512 BF16 path
        assert cpu_gemv.uses_kernel(x, weight) == (rows <= most)
        got = cpu_gemv.linear(x, weight, b)
    expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (1, rows, n)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 rounds the output (and its inputs)
    torch.testing.assert_close(got.float(), expected, atol=tolerance * k**0.5, rtol=tolerance)


@pytest.mark.parametrize("k", [64, 100, 1000])
@pytest.mark.parametrize("name", ["gemv_bf16_bf16", "gemv_f32"])
def test_the_portable_paths_without_avx512_agree(k, name):
    """gemv_bf16_bf16 and gemv_f32 built without AVX-512 (what other CPUs compile) against float32 math."""
    from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

    lib = load_kernel(
        "gemv.c", {name: cpu_gemv._SIGNATURE}, flags=(*DEFAULT_FLAGS, "-fopenmp", "-mno-avx512f")
    )
    if lib is None:
        pytest.skip("no C compiler")
    dtype = torch.bfloat16 if name == "gemv_bf16_bf16" else torch.float32
    gen = torch.Generator().manual_seed(k)
    w, x = torch.randn(24, k, generator=gen).to(dtype), torch.randn(5, k, generator=gen).to(dtype)
    y = torch.empty(5, 24)
    getattr(lib, name)(x.data_ptr(), w.data_ptr(), y.data_ptr(), 5, 24, k, 1)
    torch.testing.assert_close(y, x.float() @ w.float().t(), rtol=1e-4, atol=1e-4)


def test_with_gradients_on_or_many_rows_it_is_f_linear():
    weight, x = torch.randn(16, 32, requires_grad=True), torch.randn(2, 32)
    assert not cpu_gemv.uses_kernel(x, weight)  # autograd needs F.linear's backward
    cpu_gemv.linear(x, weight).sum().backward()
    assert weight.grad is not None
    with torch.inference_mode():
        assert not cpu_gemv.uses_kernel(torch.randn(64, 32), weight.detach())
        assert not cpu_gemv.uses_kernel(x, weight.detach().t().contiguous().t())  # not contiguous


def test_decode_linears_keep_parameters_state_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16, bias=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 32)
    with torch.inference_mode():
        before = model(x)
    assert use_decode_linears(model) == 2
    assert all(isinstance(m, DecodeLinear) for m in (model[0], model[2]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_linears_under_forward_mode_ad_keep_the_tangent(dtype):
    """torch.func.jvp without autograd (forward-gradient SGD) through a DecodeLinear, packed or not: the
    kernels stay out (their tensors there are wrappers without storage) and the tangent is F.linear's."""
    import torch.autograd.forward_ad as fwAD

    from effllm.kernels.autodiff import differentiating
    from effllm.models.decode_linear import DecodeLinear, prepack_bf16

    layer = torch.nn.Linear(64, 48).to(dtype)
    layer.__class__ = DecodeLinear
    prepack_bf16(layer)
    x, v = torch.randn(3, 64).to(dtype), torch.randn(3, 64).to(dtype)
    with torch.no_grad():
        assert not differentiating(x)
        got = torch.func.jvp(layer, (x,), (v,))
        expected = torch.func.jvp(
            lambda t: torch.nn.functional.linear(t, layer.weight, layer.bias), (x,), (v,)
        )
        torch.testing.assert_close(got, expected)
        with fwAD.dual_level():
            assert differentiating(x)
            tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent
        torch.testing.assert_close(tangent, expected[1])
