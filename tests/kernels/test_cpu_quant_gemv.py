"""The quantized GEMV kernels (cpu/gemv_quant.c) against QuantizedLinear's PyTorch reference path."""

import pytest
import torch
from torch import nn

from effllm.compress.rtn import QuantSpec, rtn
from effllm.kernels import cpu_quant_gemv
from effllm.models.quantized_linear import QuantizedLinear, fake_quantize_per_token, pack_int32, unpack_int32

needs_kernel = pytest.mark.skipif(not cpu_quant_gemv.available(), reason="no C compiler")
GRIDS = {  # name: (bits, group size, symmetric, activation bits)
    "w4-g32": (4, 32, True, 16),
    "w4-g64-asym": (4, 64, False, 16),
    "w4-g128": (4, 128, True, 16),
    "w8": (8, None, True, 16),
    "w8a8": (8, None, True, 8),
}


def layer(grid, n, k, dtype, bias=False, seed=0):
    bits, group, symmetric, act = grid
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(dtype)
    module = QuantizedLinear.like(
        linear, bits=bits, group_size=group, symmetric=symmetric, activation_bits=act
    )
    qw = rtn(linear.weight.detach().float(), QuantSpec(bits, group, symmetric))
    module.set_codes(qw.q, qw.scale, qw.zero)
    if bias:
        module.bias = nn.Parameter(linear.bias.detach().clone())
    return module


@needs_kernel
@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [128, 384, 576, 160])
def test_kernel_matches_the_reference(name, rows, dtype, k):
    bits, group, *_ = GRIDS[name]
    if group and k % group:
        pytest.skip("K must be a multiple of the group")
    module = layer(GRIDS[name], 48, k, dtype, bias=True)
    x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.inference_mode():
        assert module.uses_kernel(rows)
        got = module(x)
        # the 4-bit kernel computes with bfloat16 activations when the CPU has AVX-512 BF16 and K % 64 == 0
        xr = (
            x.to(torch.bfloat16).float()
            if bits == 4 and k % 64 == 0 and "avx512_bf16" in _features()
            else x.float()
        )
        expected = module.reference_forward(xr).float()
    assert got.dtype == dtype and got.shape == (1, rows, 48)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance * k**0.5)


def _features():
    from effllm.kernels.cpu.build import cpu_features

    return cpu_features()


@needs_kernel
@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_dequantizer_matches_pytorch(name, dtype):
    module = layer(GRIDS[name], 64, 256, torch.bfloat16)
    assert torch.equal(module.dequantized_weight(dtype), module.reference_weight(dtype))


def test_many_rows_and_gradients_take_the_reference_path():
    module = layer(GRIDS["w4-g32"], 32, 64, torch.float32)
    assert not module.uses_kernel(cpu_quant_gemv.MAX_ROWS[4, 16] + 1)
    with torch.enable_grad():
        assert not module.uses_kernel(1)


def test_packing_is_compressed_tensors_layout_by_hand():
    codes = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -2]], dtype=torch.int8)  # stored as q + 8, low nibble first
    packed = pack_int32(codes, 4)
    nibbles = [0, 15, 8, 9, 7, 10, 11, 6]
    assert packed.item() == sum(n << (4 * i) for i, n in enumerate(nibbles))  # top nibble < 8: positive
    assert torch.equal(unpack_int32(packed, 4, (1, 8)), codes)
    assert pack_int32(torch.full((1, 8), 7, dtype=torch.int8), 4).item() == -1  # all nibbles 15: int32 -1
    rows = torch.randint(-8, 8, (19, 5), dtype=torch.int8)  # zero points: packed along N with padding
    assert torch.equal(unpack_int32(pack_int32(rows, 4, dim=0), 4, (19, 5), dim=0), rows)


@pytest.mark.parametrize(("bits", "dim"), [(4, 1), (4, 0), (8, 1)])
def test_packing_equals_compressed_tensors(bits, dim):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(lo, hi, (24, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_int32(codes, bits, dim), pack_to_int32(codes, bits, packed_dim=dim))


def test_per_token_fake_quantization_by_hand():
    x = torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.0, 0.0]])
    got = fake_quantize_per_token(x)
    torch.testing.assert_close(got, torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert fake_quantize_per_token(torch.tensor([[1.0, 0.003]]))[0, 1] == 0  # below half a step of 1/127


@pytest.mark.skipif(
    not __import__("effllm.kernels.triton_quant_gemm", fromlist=["x"]).available()
    or __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and its interpreter (TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("name", ["w4-g32", "w4-g64-asym", "w8"])
@pytest.mark.parametrize("rows", [1, 5, 20])
def test_the_triton_kernel_under_the_interpreter_matches_the_reference(name, rows):
    module = layer(GRIDS[name], 80, 128, torch.float32, bias=True)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        got, expected = module.triton_forward(x), module.reference_forward(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
