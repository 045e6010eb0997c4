"""Quantized linear layers on CUDA: a Triton dequantize-GEMM over compressed-tensors' packed codes.

y[m, n] = sum_k x[m, k] * W[n, k] with W stored as `pack-quantized` int32 words (32 / bits codes per word
along K, the code q + 2^(bits-1) at bits (k % per_word) * bits), scales [N, G] and, for asymmetric grids,
unsigned zero codes [N, G] (`QuantizedLinear` derives them). Each program computes a BLOCK_M x BLOCK_N tile:
for every BLOCK_K slice it loads the words (each word once per code it holds, from cache), shifts and
masks them to codes, dequantizes with the group's scale and zero in registers and multiplies with
`tl.dot` in float32. The weights never exist dequantized in memory.

Tested on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) against the
PyTorch reference; not yet measured on a GPU.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _quant_gemm_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        y_ptr,
        M,
        N,
        K,
        G,
        group_size,
        BITS: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        per_word = 32 // BITS
        words = (K + per_word - 1) // per_word
        offset = 1 << (BITS - 1)
        mask_code = (1 << BITS) - 1
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
            )
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            word = tl.load(w_ptr + rn[:, None] * words + rk[None, :] // per_word, mask=wmask, other=0)
            code = (word >> ((rk[None, :] % per_word) * BITS)) & mask_code
            g = rk[None, :] // group_size
            scale = tl.load(s_ptr + rn[:, None] * G + g, mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + rn[:, None] * G + g, mask=wmask, other=0).to(tl.float32)
            else:
                zero = offset
            w = (code.to(tl.float32) - zero) * scale
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def quant_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_codes: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] @ W^T for pack-quantized `packed` [N, words], scale [N, G], zero codes
    uint8 [N, G] (None: symmetric)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    m, k = x.shape
    n = scale.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    zero = zero_codes if zero_codes is not None else scale  # unused when HAS_ZERO is False
    _quant_gemm_kernel[grid](
        x.contiguous(),
        packed,
        scale.contiguous(),
        zero,
        y,
        m,
        n,
        k,
        scale.shape[1],
        group_size,
        BITS=bits,
        HAS_ZERO=zero_codes is not None,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=32,
    )
    return y
