"""The palettized GEMV and dequantizer (cpu/gemv_palette.c) against PalettizedLinear's PyTorch reference:
every bit width, float32 and bfloat16 activations and palettes, palettes shared by groups of rows, and the
three builds a CPU may get (AVX-512 with VBMI + GFNI, AVX-512 without them, no AVX-512 at all)."""

import pytest
import torch

from effllm.kernels import cpu_palette_gemv
from effllm.kernels.cpu.build import DEFAULT_FLAGS, cpu_features, load_kernel
from effllm.models.palettized_linear import PalettizedLinear

needs_kernel = pytest.mark.skipif(not cpu_palette_gemv.available(), reason="no C compiler")


def layer(bits, n=48, k=256, rows_per_palette=16, dtype=torch.float32, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    module = PalettizedLinear(k, n, bias, bits, rows_per_palette, dtype=dtype)
    module.set_indices(
        torch.randint(0, 2**bits, (n, k), generator=gen),
        torch.randn(n // module.rows_per_palette, 2**bits, generator=gen),
    )
    if bias:
        module.bias = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype), requires_grad=False)
    return module


def check(got, module, x):
    expected = module.reference_forward(x.float()).float()
    tolerance = 1e-5 if x.dtype == torch.float32 else 1e-2  # bfloat16 rounds the output
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance * x.shape[-1] ** 0.5)


@needs_kernel
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 12])
def test_the_product_matches_the_reference(bits, dtype, rows):
    module = layer(bits, dtype=dtype, bias=True)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.inference_mode():
        got = cpu_palette_gemv.gemv(x, module.planes, module.palette, bits, module.rows_per_palette)
        check(got + module.bias.to(dtype), module, x)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("palette_dtype", [torch.float32, torch.bfloat16])
def test_the_dequantizer_is_exact_and_reads_any_rows(bits, dtype, palette_dtype):
    module = layer(bits, n=64, k=96, rows_per_palette=16, dtype=palette_dtype)
    dense = module.dequantized_weight(torch.float32).to(dtype)
    assert torch.equal(cpu_palette_gemv.dequantize(module.planes, module.palette, bits, 16, 96, dtype), dense)
    part = cpu_palette_gemv.dequantize(module.planes, module.palette, bits, 16, 96, dtype, rows=slice(13, 40))
    assert torch.equal(part, dense[13:40])  # tiles that start inside a palette's rows


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_multiply_tiles_of_the_dequantized_weight(dtype, monkeypatch):
    module = layer(3, n=80, k=128, rows_per_palette=40, dtype=dtype)
    monkeypatch.setattr(cpu_palette_gemv, "TILE_BYTES", 128 * 24 * dtype.itemsize)  # tiles of 24 rows
    x = torch.randn(2, 20, 128).to(dtype)
    with torch.inference_mode():
        got = module(x)
    assert got.shape == (2, 20, 80) and got.dtype == dtype
    check(got, module, x)


def test_with_gradients_the_layer_is_its_reference():
    module = layer(3)
    x = torch.randn(2, 256, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, module.dequantized_weight().sum(0).expand(2, -1))


BUILDS = {  # name: (extra flags, the CPU features it needs to run, the path it takes for bfloat16)
    "no-avx512": (("-mno-avx512f",), set(), "scalar"),
    "avx512-without-gfni": (
        ("-mno-gfni", "-mno-avx512vbmi"),
        {"avx512f", "avx512bw", "avx512_bf16"},
        "avx512-bf16",
    ),
}


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_the_portable_builds_agree(build, bits):
    """The kernel as a CPU without VBMI/GFNI, or without AVX-512, compiles it."""
    flags, needs, bf16_path = BUILDS[build]
    if not needs <= cpu_features():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_features())}")
    lib = load_kernel(
        "gemv_palette.c", cpu_palette_gemv._SIGNATURES, flags=(*DEFAULT_FLAGS, "-fopenmp", *flags)
    )
    if lib is None:
        pytest.skip("no C compiler")
    for dtype in (torch.float32, torch.bfloat16):
        module = layer(bits, n=32, k=160, rows_per_palette=8, dtype=dtype)
        path = cpu_palette_gemv.path(bits, dtype == torch.bfloat16, dtype == torch.bfloat16, lib=lib)
        assert path == (
            bf16_path if dtype == torch.bfloat16 and bits <= 5 else bf16_path.replace("-bf16", "")
        )
        for rows in (1, 6):
            x = torch.randn(rows, 160).to(dtype)
            check(cpu_palette_gemv.gemv(x, module.planes, module.palette, bits, 8, lib=lib), module, x)
        dense = cpu_palette_gemv.dequantize(module.planes, module.palette, bits, 8, 160, dtype, lib=lib)
        assert torch.equal(dense, module.dequantized_weight(dtype))
