"""Decode-sized linear layers on the CPU through our own GEMV kernel (`cpu/gemv.c`).

At batch 1 a decode step is a stream over the weights, and torch's `F.linear` (MKL, oneDNN) reads them at
about half the machine's bandwidth at M = 1 (docs/benchmarks.md has the measured table). `linear` runs
x [..., K] @ weight[N, K]^T (+ bias) through the kernel when the rows are few enough for it to win and
the weight is float32 or bfloat16 on the CPU, and through `F.linear` otherwise; the result has x's dtype.
bfloat16 activations with bfloat16 weights use AVX-512 BF16 dot products where the CPU has them.
The crossovers below were measured on a 2-core AVX-512 machine (SmolLM-135M shapes, 2 threads).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from effllm.kernels.autodiff import differentiating
from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

# Most rows (tokens) for which the kernel beats F.linear, by weight dtype; bfloat16 weights with bfloat16
# activations on a CPU with AVX-512 BF16 take `gemv_bf16_bf16` (vdpbf16ps, four rows per pass), which beats
# F.linear up to 8 rows (1.5-2x at 5-8 rows, SmolLM-135M and default-model shapes, 2 threads; an ad hoc
# timing, not a committed benchmark: `effllm bench spec-decode` shows its end-to-end effect).
MAX_ROWS = {torch.float32: 8, torch.bfloat16: 2}
MAX_ROWS_BF16_NATIVE = 8

_p, _i = ctypes.c_void_p, ctypes.c_int64
_SIGNATURE = ([_p, _p, _p, _i, _i, _i, ctypes.c_int], None)


@cache
def _library() -> ctypes.CDLL | None:
    return load_kernel(
        "gemv.c",
        {
            "gemv_f32": _SIGNATURE,
            "gemv_bf16": _SIGNATURE,
            "gemv_bf16_bf16": _SIGNATURE,
            "gemv_bf16_bf16_native": ([], ctypes.c_int),
        },
        flags=(*DEFAULT_FLAGS, "-fopenmp"),
    )


@cache
def bf16_native() -> bool:
    """Whether the compiled kernel has the AVX-512 BF16 path (bfloat16 activations times weights)."""
    lib = _library()
    return lib is not None and bool(lib.gemv_bf16_bf16_native())


def gemv_available() -> bool:
    """Whether the compiled kernel is usable (compiled on the first call)."""
    return _library() is not None


def _native(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and bf16_native()


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    most = MAX_ROWS.get(weight.dtype, 0)
    if rows > most and weight.dtype == torch.bfloat16 and gemv_available() and _native(x, weight):
        most = MAX_ROWS_BF16_NATIVE
    return (
        weight.device.type == "cpu"
        and rows <= most
        and weight.is_contiguous()
        and not torch.is_grad_enabled()  # F.linear's backward, even for inputs that need no grad
        and not differentiating(x)  # torch.func transforms, forward-mode AD
        and gemv_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the GEMV kernel when `uses_kernel` says it wins."""
    if not uses_kernel(x, weight):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    native = _native(x, weight)
    x2 = x.reshape(-1, k).to(torch.bfloat16 if native else torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if native:
        kernel = _library().gemv_bf16_bf16
    else:
        kernel = _library().gemv_f32 if weight.dtype == torch.float32 else _library().gemv_bf16
    kernel(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), x2.shape[0], n, k, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
