"""Decode-sized linear layers on the CPU through our own GEMV kernel (`cpu/gemv.c`).

At batch 1 a decode step is a stream over the weights, and torch's `F.linear` (MKL, oneDNN) reads them at
about half the machine's bandwidth at M = 1 (docs/benchmarks.md has the measured table). `linear` runs
x [..., K] @ weight[N, K]^T (+ bias) through the kernel when the rows are few enough for it to win and
the weight is float32 or bfloat16 on the CPU, and through `F.linear` otherwise; the result has x's dtype.
The crossovers below were measured on a 2-core AVX-512 machine (SmolLM-135M shapes, 2 threads).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

# Most rows (tokens) for which the kernel beats F.linear, by weight dtype.
MAX_ROWS = {torch.float32: 8, torch.bfloat16: 2}

_p, _i = ctypes.c_void_p, ctypes.c_int64
_SIGNATURE = ([_p, _p, _p, _i, _i, _i, ctypes.c_int], None)


@cache
def _library() -> ctypes.CDLL | None:
    return load_kernel(
        "gemv.c", {"gemv_f32": _SIGNATURE, "gemv_bf16": _SIGNATURE}, flags=(*DEFAULT_FLAGS, "-fopenmp")
    )


def gemv_available() -> bool:
    """Whether the compiled kernel is usable (compiled on the first call)."""
    return _library() is not None


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        weight.device.type == "cpu"
        and rows <= MAX_ROWS.get(weight.dtype, 0)
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
        and gemv_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the GEMV kernel when `uses_kernel` says it wins."""
    if not uses_kernel(x, weight):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    kernel = _library().gemv_f32 if weight.dtype == torch.float32 else _library().gemv_bf16
    kernel(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), x2.shape[0], n, k, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
