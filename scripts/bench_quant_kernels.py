"""Microbenchmark of the quantized CPU kernels (docs/compression.md): one linear layer, hot weights.

    python scripts/bench_quant_kernels.py

Part 1: batch-1 time of the 4-bit g32 kernel against the bf16 GEMV on two large matrices, with GB/s of the
bytes each reads. Part 2: time per call against rows, kernel versus dequantize + F.linear versus bf16
F.linear, on a SmolLM-135M shape (576 x 1536): where `cpu_quant_gemv.MAX_ROWS` comes from.
"""

import time
from functools import partial

import torch

from effllm.compress.rtn import QuantSpec, rtn
from effllm.kernels import cpu_quant_gemv
from effllm.kernels.cpu_gemv import linear as gemv_linear
from effllm.models.quantized_linear import QuantizedLinear

GRIDS = {"w4a16 g32": (4, 32, 16), "w8a16": (8, None, 16), "w8a8": (8, None, 8)}


def quantized(linear, bits, group, act):
    module = QuantizedLinear.like(linear, bits=bits, group_size=group, symmetric=True, activation_bits=act)
    qw = rtn(linear.weight.detach().float(), QuantSpec(bits, group, True))
    module.set_codes(qw.q, qw.scale, qw.zero)
    return module


def timed(fn, n=20):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


@torch.inference_mode()
def main():
    print(f"threads {torch.get_num_threads()}, kernels: {cpu_quant_gemv.isa()}")
    for k, n in ((576, 49152), (1536, 16384)):
        linear = torch.nn.Linear(k, n, bias=False).bfloat16()
        module, x = quantized(linear, 4, 32, 16), torch.randn(1, k).bfloat16()
        for name, fn, nbytes in (
            ("w4a16 g32", partial(module, x), k * n * 0.5625),
            ("bf16 gemv", partial(gemv_linear, x, linear.weight), k * n * 2),
        ):
            us = timed(fn)
            print(f"{k} x {n} {name:10s} {us:8.0f} us  {nbytes / us / 1e3:5.1f} GB/s")
    linear = torch.nn.Linear(576, 1536, bias=False).bfloat16()
    limits = dict(cpu_quant_gemv.MAX_ROWS)
    for name, grid in GRIDS.items():
        module = quantized(linear, *grid)
        for rows in (1, 4, 8, 16, 32, 64):
            x = torch.randn(rows, 576).bfloat16()
            cpu_quant_gemv.MAX_ROWS.update({key: 10**6 for key in limits})
            kernel = timed(partial(module, x))
            cpu_quant_gemv.MAX_ROWS.update({key: 0 for key in limits})
            dequant = timed(partial(module, x))
            cpu_quant_gemv.MAX_ROWS.update(limits)
            dense = timed(partial(torch.nn.functional.linear, x, linear.weight))
            print(
                f"{name:10s} rows {rows:3d}: kernel {kernel:6.0f} us  dequantize+linear {dequant:6.0f} us  "
                f"bf16 linear {dense:6.0f} us"
            )


if __name__ == "__main__":
    main()
