"""Decode-sized quantized linear layers on the CPU through our own kernels (`cpu/gemv_quant.c`).

The kernels read the checkpoint's own bytes (compressed-tensors' packed codes and scales), so nothing is
repacked at load. Each function returns None when the compiled library is unavailable; callers then take
their PyTorch reference path. All take x [M, K] float32 (contiguous) and return y [M, N] float32 (the C functions also take and return
bfloat16, which `QuantizedLinear` uses for bfloat16 models).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from effllm.kernels.cpu.build import DEFAULT_FLAGS, cpu_features, load_kernel

# Rows (tokens) up to which the kernels beat dequantize + F.linear, by (weight bits, activation bits);
# measured on SmolLM-135M shapes, 2 threads (docs/compression.md).
MAX_ROWS = {(4, 16): 8, (8, 16): 8, (8, 8): 16}

_p, _i, _c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "gemv_w4": ([_p, _p, _p, _c, _p, _p, _i, _i, _i, _i, _c, _c], None),
    "gemv_w8": ([_p, _p, _p, _c, _p, _i, _i, _i, _c, _c], None),
    "gemv_w8a8": ([_p, _p, _p, _c, _p, _p, _i, _i, _i, _c, _c], None),
    "dequantize_rows": ([_p, _c, _c, _p, _c, _p, _p, _c, _i, _i, _i, _c], None),
}


@cache
def _library() -> ctypes.CDLL | None:
    return load_kernel("gemv_quant.c", _SIGNATURES, flags=(*DEFAULT_FLAGS, "-fopenmp"))


def available() -> bool:
    return _library() is not None


def isa() -> str:
    """What the compiled kernels use on this CPU: `avx512-vnni`, `avx512` or `scalar`."""
    features = cpu_features()
    if "avx512f" not in features:
        return "scalar"
    return "avx512-vnni" if "avx512_vnni" in features else "avx512"


def _scale_args(scale: torch.Tensor) -> tuple[int, int]:
    if scale.dtype not in (torch.float32, torch.bfloat16) or not scale.is_contiguous():
        raise ValueError("scales must be contiguous float32 or bfloat16")
    return scale.data_ptr(), int(scale.dtype == torch.bfloat16)


def gemv_w4(x, packed, scale, zero_codes, group_size: int) -> torch.Tensor | None:
    """y = x @ W^T for 4-bit codes `packed` [N, K/2] bytes (any 4-byte dtype view), scale [N, G], zero
    codes uint8 [N, G] (None: symmetric, zero 8)."""
    lib = _library()
    if lib is None:
        return None
    m, k = x.shape
    n = scale.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    zp = None if zero_codes is None else zero_codes.data_ptr()
    lib.gemv_w4(
        x.data_ptr(),
        packed.data_ptr(),
        *_scale_args(scale),
        zp,
        y.data_ptr(),
        m,
        n,
        k,
        group_size,
        0,
        torch.get_num_threads(),
    )
    return y


def gemv_w8(x, codes, scale) -> torch.Tensor | None:
    """y = x @ W^T for unsigned 8-bit codes (q + 128) [N, K] and per-channel scale [N] or [N, 1]."""
    lib = _library()
    if lib is None:
        return None
    m, k = x.shape
    n = scale.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.gemv_w8(
        x.data_ptr(), codes.data_ptr(), *_scale_args(scale), y.data_ptr(), m, n, k, 0, torch.get_num_threads()
    )
    return y


def gemv_w8a8(x, weight, scale, rowsum) -> torch.Tensor | None:
    """y = quant8(x) @ W^T with per-row dynamic int8 activations, int8 weight [N, K], scale [N] or [N, 1],
    rowsum int32 [N] (sum of each weight row)."""
    lib = _library()
    if lib is None:
        return None
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.gemv_w8a8(
        x.data_ptr(),
        weight.data_ptr(),
        *_scale_args(scale),
        rowsum.data_ptr(),
        y.data_ptr(),
        m,
        n,
        k,
        0,
        torch.get_num_threads(),
    )
    return y
