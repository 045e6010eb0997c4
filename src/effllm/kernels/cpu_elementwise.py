"""The decoder's elementwise steps (RMSNorm, rotary embeddings, SiLU(gate) * up) in one C pass each, for
inference on the CPU (`cpu/elementwise.c`).

PyTorch runs each as four to six ops (RMSNorm: a float copy, pow, mean, rsqrt, two multiplies and a cast),
every one a pass over memory and an OpenMP fork and join. On the engine's steps that the fused decode step
does not take (prefill chunks, decode batches of more than 16) they were about a tenth of a bfloat16
throughput run (docs/benchmarks.md). The modules call these only without autograd, on CPU float32 or
bfloat16 tensors whose last dim is contiguous; each returns None where it does not apply, and the module
keeps its PyTorch expression. Results round where the PyTorch expressions round (tested against them).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from effllm.kernels.autodiff import differentiating
from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

_p, _i, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
DTYPES = (torch.float32, torch.bfloat16)


@cache
def _library() -> ctypes.CDLL | None:
    return load_kernel(
        "elementwise.c",
        {
            "rms_norm": ([_p, _i, _p, _p, _i, _i, ctypes.c_float, _int, _int], None),
            "rotary": ([_p, _i, _p, _i, _i, _i, _p, _p, _i, _i, _int, _int], None),
            "silu_mul": ([_p, _p, _i, _i, _int, _int], None),
        },
        flags=(*DEFAULT_FLAGS, "-fopenmp", "-ffp-contract=off"),
    )


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels may take x: inference on a CPU float32/bfloat16 tensor. Not under autograd, nor
    under forward-mode AD (a `torch.func` transform such as `jvp`, whose tensors are wrappers without
    storage, or a `forward_ad` dual level, whose tensors carry tangents the kernels would drop)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and not differentiating(x) and _library() is not None


def _rows(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row stride) of x seen as [rows, last dim], or None when its rows are not evenly spaced."""
    if x.stride(-1) != 1:
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.dim() == 1 or rows <= 1:
        return rows, x.shape[-1]
    stride = x.stride(-2)
    expected = stride
    for size, st in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1]), strict=True):
        if size > 1 and st != expected:
            return None
        expected *= size
    return rows, stride


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * (x / rms(x)), normalised in float32 and cast to x's dtype first (Llama's RMSNorm)."""
    layout = _rows(x)
    if layout is None or weight.dtype != x.dtype or differentiating(weight):
        return None
    rows, stride = layout
    out = torch.empty(x.shape, dtype=x.dtype)
    weight = weight.contiguous()
    bf16 = int(x.dtype == torch.bfloat16)
    _library().rms_norm(
        x.data_ptr(),
        stride,
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        x.shape[-1],
        eps,
        bf16,
        torch.get_num_threads(),
    )
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x cos + rotate_half(x) sin for x [B, T, heads, D] and cos, sin [B or 1, T, D]; a new contiguous tensor."""
    if x.dim() != 4 or cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape != sin.shape:
        return None
    b, t, heads, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or (b > 1 and x.stride(0) != t * x.stride(1)) or d % 2:
        return None
    if cos.dim() != 3 or cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b):
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    per_batch, cs_batch = (t, t if cos.shape[0] == b else 0)
    bf16 = int(x.dtype == torch.bfloat16)
    _library().rotary(
        x.data_ptr(),
        x.stride(1),
        out.data_ptr(),
        b * t,
        heads,
        d,
        cos.data_ptr(),
        sin.data_ptr(),
        per_batch,
        cs_batch,
        bf16,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up from a contiguous [..., 2n] tensor holding gate then up (the fused gate/up output)."""
    if not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
        return None
    n = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype)
    rows = gate_up.numel() // gate_up.shape[-1] if gate_up.shape[-1] else 0
    bf16 = int(gate_up.dtype == torch.bfloat16)
    _library().silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, n, bf16, torch.get_num_threads())
    return out
