"""A compiled CPU kernel for paged decode attention (float32, bfloat16, int8 or int4 cache), the CPU engine's
fast path.

The PyTorch path (`paged_decode_attention`) gathers every decode's blocks into a padded copy before
SDPA reads them: three passes over the keys and values, plus padding. This kernel walks each sequence's
blocks in place and reads each key and value once. A float32 or bfloat16 cache goes through
`paged_decode` (`cpu/attention.h`: each sequence's keys in shares, every head of a token at once,
AVX-512 dot products or, for a bfloat16 cache on a CPU with AMX, tile products, OpenMP tasks in one parallel region); an int8 or int4 cache (`kv_quant.py`) is
dequantized in registers by `paged_decode_quant`, whose rows a few Python threads split (ctypes releases
the GIL). It is `cpu/paged_decode.c`, compiled on first use by `cpu.build.load_kernel`. Without a compiler
the engine keeps the PyTorch path. Tested against dense SDPA like every other backend.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

_p, _i = ctypes.c_void_p, ctypes.c_int64
_SIGNATURE = (
    [
        _p,
        ctypes.c_int,
        _p,
        _p,
        ctypes.c_int,
        _p,
        _i,
        _p,
        _p,
        _i,
        _i,
        _i,
        _i,
        _i,
        ctypes.c_float,
        ctypes.c_int,
        _p,
        _p,
    ],
    None,
)
_QUANT_SIGNATURE = (
    [_p, _p, _p, _p, _p, _p, _i, _p, _p, _i, _i, _i, _i, ctypes.c_float, _i, _i, _i, _p],
    None,
)
_SIGNATURES = {
    "paged_decode": _SIGNATURE,
    "paged_decode_work": ([_i, _i, _i, _i, _i], _i),
    "paged_decode_amx": ([], ctypes.c_int),
    "paged_decode_quant": _QUANT_SIGNATURE,
}
# The cache dtypes the kernel reads (q and out are float32 inside it).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_pool: ThreadPoolExecutor | None = None


@cache
def _library() -> ctypes.CDLL | None:
    return load_kernel("paged_decode.c", _SIGNATURES, flags=(*DEFAULT_FLAGS, "-fopenmp"))


def cpu_kernel_available() -> bool:
    """Whether the compiled kernel is usable (compiled on the first call)."""
    return _library() is not None


def amx_scores_available() -> bool:
    """Whether a bfloat16 cache's scores take AMX tiles (`cpu/attention.h`): the kernel was built for a CPU
    with AMX-BF16 and Linux granted the process the tile state."""
    lib = _library()
    return lib is not None and bool(lib.paged_decode_amx())


def split_rows(lens: list[int], lo: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous row ranges with about equal numbers of keys to read."""
    work = [n - f for n, f in zip(lens, lo, strict=True)]
    total, bounds, acc, start = sum(work), [], 0, 0
    for row, w in enumerate(work):
        acc += w
        if len(bounds) < parts - 1 and acc * parts >= total * (len(bounds) + 1):
            bounds.append((start, row + 1))
            start = row + 1
    bounds.append((start, len(work)))
    return [b for b in bounds if b[0] < b[1]]


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    lo: torch.Tensor,
    splits: list[tuple[int, int]],
    scale: float,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    kv_bits: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its paged keys, a float32, bfloat16 or (with params and bits) int8/int4
    cache on CPU; needs `cpu_kernel_available()`. The result has q's dtype.

    q: [B, H, D]; block_tables: [B, width] int64, each row the sequence's blocks from position 0;
    lens, lo: [B] int64, row b sees keys lo[b] .. lens[b]-1; `splits` (from `split_rows`) are the row
    ranges the quantized kernel computes in parallel (the float kernel splits by itself). Returns [B, H, D].
    """
    global _pool
    q_dtype = q.dtype
    block_tables = block_tables.contiguous()
    b, h, d = q.shape
    lib = _library()
    pages = (block_tables.data_ptr(), block_tables.shape[1], lens.data_ptr(), lo.data_ptr())
    heads = (k_cache.shape[2], d, k_cache.shape[1], scale)  # kv heads, head dim, block size, scale
    if kv_bits is None:
        # float32 or bfloat16 queries as they are (the kernel widens and rounds), others through float32
        q = q.contiguous() if q_dtype in KERNEL_DTYPES else q.float().contiguous()
        out = torch.empty_like(q)
        threads = torch.get_num_threads()
        max_keys = int((lens - lo).max())
        work = torch.empty(lib.paged_decode_work(b, h, d, max_keys, threads), dtype=torch.float32)
        bf16, io_bf16 = int(k_cache.dtype == torch.bfloat16), int(q.dtype == torch.bfloat16)
        lib.paged_decode(
            q.data_ptr(),
            io_bf16,
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            bf16,
            *pages,
            b,
            h,
            *heads,
            threads,
            work.data_ptr(),
            out.data_ptr(),
        )
        return out.to(q_dtype)
    q = q.to(torch.float32).contiguous()
    out = torch.empty_like(q)
    caches = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
    args = (*caches, k_params.data_ptr(), v_params.data_ptr(), *pages, h, *heads, kv_bits)
    if len(splits) > 1 and _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="effllm-attn")
    kernel = lib.paged_decode_quant
    futures = [_pool.submit(kernel, *args, start, end, out.data_ptr()) for start, end in splits[1:]]
    kernel(*args, splits[0][0], splits[0][1], out.data_ptr())
    for future in futures:
        future.result()
    return out.to(q_dtype)
