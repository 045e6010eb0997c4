"""Microbenchmark of the palettized (lookup-table) CPU kernel (docs/compression.md): one layer, hot weights.

    python scripts/bench_palette_kernel.py

Part 1: batch-1 time of `gemv_palette` at 2, 3 and 4 bits (bfloat16 and float32 activations) against the
4-bit g32 kernel and the bf16 GEMV on large matrices, with GB/s of the bytes each reads. Part 2: time per
call against rows, the product versus tiles dequantized and multiplied (`cpu_palette_gemv.linear`), on the
SmolLM-135M shapes: where `cpu_palette_gemv.MAX_ROWS` comes from.
"""

import torch
from bench_quant_kernels import timed  # scripts/, beside this one

from effllm.compress.rtn import QuantSpec, rtn
from effllm.kernels import cpu_palette_gemv, cpu_quant_gemv
from effllm.kernels.cpu_gemv import linear as gemv_linear
from effllm.models.palettized_linear import PalettizedLinear
from effllm.models.quantized_linear import QuantizedLinear


def palettized(k, n, bits, dtype):
    module = PalettizedLinear(k, n, False, bits, dtype=dtype)
    module.set_indices(torch.randint(0, 2**bits, (n, k)), torch.randn(1, 2**bits) * 0.02)
    return module


@torch.inference_mode()
def main():
    print(
        f"threads {torch.get_num_threads()}, palette kernel: {cpu_palette_gemv.path(3, True, True)} (bf16), "
        f"{cpu_palette_gemv.path(3, False, False)} (fp32); 4-bit kernel: {cpu_quant_gemv.isa()}"
    )
    for k, n in ((576, 49152), (1536, 16384), (4096, 4096)):
        linear = torch.nn.Linear(k, n, bias=False).bfloat16()
        w4 = QuantizedLinear.like(linear, bits=4, group_size=32, symmetric=True, activation_bits=16)
        qw = rtn(linear.weight.detach().float(), QuantSpec(4, 32, True))
        w4.set_codes(qw.q, qw.scale, qw.zero)
        x = torch.randn(1, k).bfloat16()
        rows = [("bf16 gemv", lambda x=x, w=linear.weight: gemv_linear(x, w), k * n * 2)]
        rows.append(("w4a16 g32", lambda x=x, w4=w4: w4(x), k * n * 0.5625))
        for bits in (4, 3, 2):
            for dtype in (torch.bfloat16, torch.float32):
                module, xd = palettized(k, n, bits, dtype), x.to(dtype)
                name = f"pal{bits} {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
                rows.append((name, lambda m=module, xd=xd: m(xd), k * n * bits / 8))
        for name, fn, nbytes in rows:
            us = timed(fn)
            print(f"{k} x {n} {name:10s} {us:8.0f} us  {nbytes / us / 1e3:5.1f} GB/s")
    for k, n in ((576, 1536), (1536, 576)):
        for dtype in (torch.bfloat16, torch.float32):
            module = palettized(k, n, 3, dtype)
            for rows in (1, 2, 4, 8, 12, 16, 32):
                x = torch.randn(rows, k).to(dtype)
                args = (x, module.planes, module.palette, 3, n)
                product = timed(lambda args=args: cpu_palette_gemv.gemv(*args))
                tiles = timed(lambda args=args: cpu_palette_gemv.linear(*args))
                print(
                    f"{k} x {n} {str(dtype)[6:]:8s} rows {rows:3d}: product {product:6.0f} us  tiles {tiles:6.0f} us"
                )


if __name__ == "__main__":
    main()
