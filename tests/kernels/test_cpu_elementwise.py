"""The C elementwise steps equal the modules' PyTorch expressions, rounding included."""

import pytest
import torch
import torch.nn.functional as F

from effllm.kernels import cpu_elementwise
from effllm.models.rope import _rotate_half

pytestmark = pytest.mark.skipif(cpu_elementwise._library() is None, reason="no C compiler")


@pytest.fixture(params=["native", "no-avx512"], autouse=True)
def build(request, monkeypatch):
    """Every test on this CPU's build and on the portable one (-mno-avx512f, what other CPUs compile)."""
    if request.param == "no-avx512":
        from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

        lib = load_kernel(
            "elementwise.c",
            {
                name: (getattr(cpu_elementwise._library(), name).argtypes, None)
                for name in ("rms_norm", "rotary", "silu_mul")
            },
            flags=(*DEFAULT_FLAGS, "-fopenmp", "-ffp-contract=off", "-mno-avx512f"),
        )
        monkeypatch.setattr(cpu_elementwise, "_library", lambda: lib)
    return request.param


def torch_rms_norm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_rms_norm_matches_the_module_expression(dtype, rows):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(rows, 700, generator=gen).to(dtype)
    x = wide[:, :576]  # rows 700 apart, as a view of a wider tensor
    weight = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)
    with torch.inference_mode():
        got = cpu_elementwise.rms_norm(x, weight, 1e-5)
    expected = torch_rms_norm(x, weight, 1e-5)
    assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:  # the sum of squares in another order: the last bits
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # bf16: the same values but where the float32 normalised value sits on a rounding boundary
        assert (got != expected).float().mean() < 1e-3
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "shared"), [(1, True), (3, True), (3, False)])
def test_rotary_matches_the_module_expression_exactly(dtype, b, shared):
    gen = torch.Generator().manual_seed(1)
    t, heads, d = 7, 5, 64
    qkv = torch.randn(b, t, heads * d + 40, generator=gen).to(dtype)
    x = qkv[..., : heads * d].view(b, t, heads, d)  # a view with rows heads * d + 40 apart
    angles = torch.randn(1 if shared else b, t, d // 2, generator=gen)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    with torch.inference_mode():
        got = cpu_elementwise.rotary(x, cos, sin)
    expected = x * cos.unsqueeze(2) + _rotate_half(x) * sin.unsqueeze(2)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_module_expression(dtype):
    gen = torch.Generator().manual_seed(2)
    gate_up = (3 * torch.randn(33, 2 * 300, generator=gen)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    with torch.inference_mode():
        got = cpu_elementwise.silu_mul(gate_up)
    gate, up = gate_up.split(300, dim=-1)
    expected = F.silu(gate) * up
    if dtype == torch.float32:  # exp within 2 ulp of torch's
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    else:
        assert (got != expected).float().mean() < 1e-3
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-3)


def test_modules_use_the_kernels_only_without_autograd():
    from effllm.models.layers import RMSNorm

    norm = RMSNorm(16)
    x = torch.randn(4, 16, requires_grad=True)
    assert not cpu_elementwise.applies(x)  # training: PyTorch's ops, with their backward
    norm(x).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert cpu_elementwise.applies(x)
        torch.testing.assert_close(norm(x), torch_rms_norm(x, norm.weight, norm.eps), rtol=1e-6, atol=1e-6)


def test_forward_mode_ad_keeps_the_pytorch_expressions():
    """jvp (torch.func) and dual tensors (forward_ad) need the modules' own ops: the kernels would drop the
    tangents (forward-gradient SGD runs a jvp without autograd)."""
    import torch.autograd.forward_ad as fwAD

    from effllm.models.layers import RMSNorm

    norm = RMSNorm(16)
    x, v = torch.randn(4, 16), torch.randn(4, 16)
    with torch.no_grad():
        expected = torch.func.jvp(lambda t: torch_rms_norm(t, norm.weight, norm.eps), (x,), (v,))[1]
        got = torch.func.jvp(norm, (x,), (v,))[1]
        torch.testing.assert_close(got, expected)
        with fwAD.dual_level():
            assert not cpu_elementwise.applies(fwAD.make_dual(x, v))
            tangent = fwAD.unpack_dual(norm(fwAD.make_dual(x, v))).tangent
        torch.testing.assert_close(tangent, expected)
