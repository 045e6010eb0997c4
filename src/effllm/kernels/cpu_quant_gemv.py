"""Decode-sized quantized linear layers on the CPU through our own kernels (`cpu/gemv_quant.c`).

The kernels read the checkpoint's own bytes (compressed-tensors' packed codes and scales), so nothing is
repacked at load. `QuantizedLinear` calls them (signatures below; x and y float32 or bfloat16) and takes
its PyTorch reference path when `library()` is None.
"""

from __future__ import annotations

import ctypes
from functools import cache

from effllm.kernels.cpu.build import DEFAULT_FLAGS, cpu_features, load_kernel

# Rows (tokens) up to which the kernels beat dequantize + F.linear, by (weight bits, activation bits);
# measured on SmolLM-135M shapes, 2 threads (docs/compression.md).
MAX_ROWS = {(4, 16): 8, (8, 16): 8, (8, 8): 16, (4, 8): 4}

_p, _i, _c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "gemv_w4": ([_p, _p, _p, _c, _p, _p, _i, _i, _i, _i, _c, _c], None),
    "gemv_w8": ([_p, _p, _p, _c, _p, _i, _i, _i, _c, _c], None),
    "gemv_w8a8": ([_p, _p, _p, _c, _p, _p, _i, _i, _i, _c, _c], None),
    "gemv_w4a8": ([_p, _p, _p, _c, _p, _p, _p, _i, _i, _i, _i, _c, _c], None),
    "dequantize_rows": ([_p, _c, _c, _p, _c, _p, _p, _c, _i, _i, _i, _c], None),
}


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels with their signatures (None without a C compiler)."""
    return load_kernel("gemv_quant.c", _SIGNATURES, flags=(*DEFAULT_FLAGS, "-fopenmp"))


def available() -> bool:
    return library() is not None


def isa() -> str:
    """What the compiled kernels use on this CPU: `scalar`, or `avx512` with `+bf16` (the 4-bit path) and
    `+vnni` (W8A8) where present."""
    features = cpu_features()
    if "avx512f" not in features:
        return "scalar"
    extras = [name for flag, name in (("avx512_bf16", "+bf16"), ("avx512_vnni", "+vnni")) if flag in features]
    return "avx512" + "".join(extras)
