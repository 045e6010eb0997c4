"""Quantized keys and values: asymmetric integer codes per token and head, as QServe's KV4 stores them.

Each vector x of `head_dim` values (one token, one kv head) becomes codes c in [0, 2^bits - 1] and two
float16 numbers, a step s and a minimum m: x ≈ c * s + m. The minimum is rounded down and the step up
when they are cast to float16, so every code lies in range before clamping and the round-trip error is at
most s / 2 (the tests check that bound). int8 stores one code per byte; int4 two, the even channel in
the low nibble. With head_dim 64, a token-head takes 68 bytes at int8 and 36 at int4 (scale and minimum
included) against 128 in bfloat16: 1.9x and 3.6x the tokens for the same memory.

This file is the reference: the engine's cache (`engine/kv_cache.py`), the CPU decode kernel
(`cpu/paged_decode.c`, which dequantizes in registers) and the Triton kernel (`paged_attention.py`)
all read this layout, and the eager round trip (`models/kv_round_trip.py`) applies the same
quantize-dequantize for evaluation.
"""

from __future__ import annotations

import torch

from effllm.core.errors import ConfigError

KV_CACHE_DTYPES = ("auto", "int8", "int4")
PARAMS = 2  # float16 step and minimum per token and head


def kv_bits(kv_cache_dtype: str) -> int | None:
    """8 or 4 for the quantized cache dtypes, None for `auto` (the model's dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"unknown KV-cache dtype {kv_cache_dtype!r}; choose {', '.join(KV_CACHE_DTYPES)}")
    return {"auto": None, "int8": 8, "int4": 4}[kv_cache_dtype]


def code_width(head_dim: int, bits: int) -> int:
    """Bytes of one token-head's codes."""
    if bits == 4 and head_dim % 2:
        raise ConfigError(
            f"an int4 KV cache needs an even head_dim, got {head_dim}; use --kv-cache-dtype int8"
        )
    return head_dim * bits // 8


def token_head_bytes(head_dim: int, bits: int | None, dtype: torch.dtype) -> int:
    """Bytes one token of one kv head takes in the cache, for K or V: codes plus step and minimum."""
    if bits is None:
        return head_dim * dtype.itemsize
    return code_width(head_dim, bits) + PARAMS * 2


def bits_per_value(head_dim: int, bits: int | None, dtype_bits: float = 16) -> float:
    """Effective bits per cached value, scales included (what `effllm analyze` counts)."""
    return dtype_bits if bits is None else bits + PARAMS * 16 / head_dim


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D * bits / 8] uint8, params [..., 2] float16: step, minimum)."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)
    lo16 = lo.to(torch.float16)
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, -torch.inf)), lo16)
    step = (hi - lo16.float()) / qmax
    step16 = step.to(torch.float16)
    step16 = torch.where(
        step16.float() < step, torch.nextafter(step16, torch.full_like(step16, torch.inf)), step16
    )
    step16 = torch.where(step16 > 0, step16, torch.ones_like(step16))  # a constant vector: codes all 0
    codes = (
        torch.round((xf - lo16.float()[..., None]) / step16.float()[..., None])
        .clamp_(0, qmax)
        .to(torch.uint8)
    )
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.stack([step16, lo16], dim=-1)


def dequantize_kv(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(codes [..., W] uint8, params [..., 2]) -> values [..., D] in `dtype`."""
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    p = params.float()
    return (codes.float() * p[..., :1] + p[..., 1:]).to(dtype)


def round_trip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What the cache gives back for x: dequantize(quantize(x)), in x's dtype."""
    return dequantize_kv(*quantize_kv(x, bits), bits, x.dtype)
