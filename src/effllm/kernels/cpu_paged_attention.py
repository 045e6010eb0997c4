"""A compiled CPU kernel for paged decode attention (float32), the CPU engine's fast path.

The PyTorch path (`paged_decode_attention`) gathers every decode's blocks into a padded copy before
SDPA reads them: three passes over the keys and values, plus padding, and OpenMP barriers that stall
when the CPU is shared. This kernel walks each sequence's blocks in place and reads each key and
value once. It is a small C function compiled on first use with the system C compiler (cached under
~/.cache/effllm, keyed by source, flags and CPU) and called through ctypes, which releases the GIL,
so a few Python threads split the batch. Without a compiler the engine keeps the PyTorch path.
Tested against dense SDPA like every other backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Rows [row_start, row_end) of a batch of single queries, one per sequence.
   q, out: [B, H, D]; k_cache, v_cache: [blocks, BS, Hkv, D]; tables: [B, width], the sequence's blocks;
   row b sees keys at positions lo[b] .. lens[b]-1 (its query sits at lens[b]-1). Tokens are the outer
   loop, so each block is read front to back, all heads of a token at once. */
void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                      int64_t width, const int64_t *lens, const int64_t *lo, int64_t H, int64_t Hkv, int64_t D,
                      int64_t BS, float scale, int64_t row_start, int64_t row_end, float *out) {
    const int64_t G = H / Hkv, token_stride = Hkv * D;
    int64_t most = 1;
    for (int64_t b = row_start; b < row_end; b++)
        if (lens[b] - lo[b] > most) most = lens[b] - lo[b];
    float *scores = malloc(sizeof(float) * H * most);
    for (int64_t b = row_start; b < row_end; b++) {
        const int64_t n = lens[b] - lo[b];
        const int64_t *table = tables + b * width;
        const float *qb = q + b * H * D;
        for (int64_t j = 0; j < n; j++) {
            const int64_t p = lo[b] + j;
            const float *kt = k_cache + (table[p / BS] * BS + p % BS) * token_stride;
            for (int64_t h = 0; h < H; h++) {
                const float *k = kt + (h / G) * D, *qh = qb + h * D;
                float s = 0.f;
                for (int64_t d = 0; d < D; d++) s += qh[d] * k[d];
                scores[h * n + j] = s * scale;
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *sh = scores + h * n, m = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < n; j++) m = sh[j] > m ? sh[j] : m;
            for (int64_t j = 0; j < n; j++) { sh[j] = expf(sh[j] - m); sum += sh[j]; }
            const float inv = 1.f / sum;
            for (int64_t j = 0; j < n; j++) sh[j] *= inv;
        }
        float *ob = out + b * H * D;
        memset(ob, 0, sizeof(float) * H * D);
        for (int64_t j = 0; j < n; j++) {
            const int64_t p = lo[b] + j;
            const float *vt = v_cache + (table[p / BS] * BS + p % BS) * token_stride;
            for (int64_t h = 0; h < H; h++) {
                const float w = scores[h * n + j], *v = vt + (h / G) * D;
                float *oh = ob + h * D;
                for (int64_t d = 0; d < D; d++) oh[d] += w * v[d];
            }
        }
    }
    free(scores);
}
"""
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"]

_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler found: the CPU engine uses the PyTorch paged attention")
        return None
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + _cpu_signature()).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effllm" / "kernels"
    target = cache / f"paged_decode_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "paged_decode.c", Path(tmp) / "paged_decode.so"
            src.write_text(_SOURCE)
            result = subprocess.run([compiler, *_FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("compiling the CPU paged-attention kernel failed; using PyTorch:\n%s", result.stderr)
                return None
            os.replace(out, target)  # atomic: concurrent builders each write a whole file
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.paged_decode_f32.argtypes = [p, p, p, p, i, p, p, i, i, i, i, ctypes.c_float, i, i, p]
    lib.paged_decode_f32.restype = None
    return lib


def cpu_kernel_available() -> bool:
    """Whether the compiled kernel is usable (compiled on the first call)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except OSError as e:  # an unwritable cache, a library that will not load
            log.warning("the CPU paged-attention kernel is unavailable (%s); using PyTorch", e)
    return _lib is not None


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
) -> torch.Tensor:
    """One query per sequence over its paged keys, float32 on CPU; needs `cpu_kernel_available()`.

    q: [B, H, D]; block_tables: [B, width] int64, each row the sequence's blocks from position 0;
    lens, lo: [B] int64, row b sees keys lo[b] .. lens[b]-1; `splits` (from `split_rows`) are the row
    ranges computed in parallel. Returns [B, H, D].
    """
    global _pool
    q, block_tables = q.contiguous(), block_tables.contiguous()
    b, h, d = q.shape
    out = torch.empty_like(q)
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            lens.data_ptr(), lo.data_ptr(), h, k_cache.shape[2], d, k_cache.shape[1], scale)
    if len(splits) > 1 and _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="effllm-attn")
    futures = [_pool.submit(_lib.paged_decode_f32, *args, start, end, out.data_ptr()) for start, end in splits[1:]]
    _lib.paged_decode_f32(*args, splits[0][0], splits[0][1], out.data_ptr())
    for future in futures:
        future.result()
    return out
