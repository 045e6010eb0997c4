"""Palettized (lookup-table) linear layers on the CPU through our own kernel (`cpu/gemv_palette.c`).

The weights are indices into a small palette stored as bit planes (`models/palettized_linear.py` has the
format); the kernel looks each weight up in a register and multiplies it where it lands, never writing
the dense matrix. `PalettizedLinear` calls it for decode-sized batches and `dequantize` for larger ones,
and takes its PyTorch reference path when `library()` is None (no C compiler).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

# Rows (tokens) up to which `gemv_palette` beats `linear` (tiles dequantized and multiplied), by activation
# dtype: `python scripts/bench_palette_kernel.py` on SmolLM-135M shapes (576x1536, 1536x576; 3 bits, 2
# threads, AVX-512 BF16 + GFNI): the product wins at 4 rows and loses at 8, in bfloat16 and float32.
MAX_ROWS = {torch.float32: 4, torch.bfloat16: 4}

_p, _i, _c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "gemv_palette": ([_p, _p, _p, _c, _p, _p, _i, _i, _i, _c, _i, _c, _c], None),
    "dequantize_palette": ([_p, _p, _c, _p, _p, _c, _i, _i, _i, _c, _i, _c], None),
    "gemv_palette_path": ([_c, _c, _c], _c),
}


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels with their signatures (None without a C compiler)."""
    return load_kernel("gemv_palette.c", _SIGNATURES, flags=(*DEFAULT_FLAGS, "-fopenmp"))


def available() -> bool:
    return library() is not None


PATHS = ("scalar", "avx512", "avx512+gfni", "avx512-bf16", "avx512-bf16+gfni")


def path(bits: int, palette_bf16: bool, io_bf16: bool, lib: ctypes.CDLL | None = None) -> str:
    """Which code `gemv_palette` runs for these arguments on this CPU: `scalar`; `avx512` (float32
    lookups, `vpermps`) or `avx512-bf16` (bfloat16 activations and palette: `vpermw` and `vdpbf16ps`),
    each `+gfni` where the indices come out of the planes by VBMI + GFNI's bit transpose."""
    lib = lib or library()
    return "none" if lib is None else PATHS[lib.gemv_palette_path(bits, int(palette_bf16), int(io_bf16))]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv(
    x: torch.Tensor,
    planes: torch.Tensor,
    palette: torch.Tensor,
    bits: int,
    rows_per_palette: int,
    row_palette: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16, contiguous) times the palettized weight [N, K]: y [M, N] in x's dtype.
    Row n uses palette n // rows_per_palette, or row_palette[n] (int32) when given; `lib`: another build of
    the kernel, for tests."""
    rows, k = x.shape
    n = planes.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype)
    (lib or library()).gemv_palette(
        x.data_ptr(),
        planes.data_ptr(),
        palette.data_ptr(),
        int(palette.dtype == torch.bfloat16),
        _ptr(row_palette),
        y.data_ptr(),
        rows,
        n,
        k,
        bits,
        rows_per_palette,
        int(x.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return y


def dequantize(
    planes: torch.Tensor,
    palette: torch.Tensor,
    bits: int,
    rows_per_palette: int,
    k: int,
    dtype: torch.dtype,
    rows: slice | None = None,
    out: torch.Tensor | None = None,
    row_palette: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """The dense weight [N, K] (or its `rows`) in `dtype` (float32 or bfloat16), into `out` when given."""
    start, stop, _ = (rows or slice(None)).indices(planes.shape[0])
    if out is None:
        out = torch.empty(stop - start, k, dtype=dtype)
    (lib or library()).dequantize_palette(
        planes.data_ptr(),
        palette.data_ptr(),
        int(palette.dtype == torch.bfloat16),
        _ptr(row_palette),
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        start,
        stop - start,
        k,
        bits,
        rows_per_palette,
        torch.get_num_threads(),
    )
    return out


TILE_BYTES = (
    4 << 20
)  # dense weight rows dequantized at a time by `linear`: cache-sized, never the whole matrix


def linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    palette: torch.Tensor,
    bits: int,
    rows_per_palette: int,
    row_palette: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] times the palettized weight for batches past MAX_ROWS: the weight is dequantized a tile of
    rows at a time into one small buffer and multiplied there (F.linear's kernels, AMX where present), so
    the dense matrix never exists whole (a matrix-sized buffer per call would also be fresh pages, whose
    faults cost more than the product)."""
    rows, k = x.shape
    n = planes.shape[0]
    tile = max(1, min(n, TILE_BYTES // (k * x.element_size())))
    scratch = torch.empty(tile, k, dtype=x.dtype)
    args = (planes, palette, bits, rows_per_palette, k, x.dtype)
    if tile == n:  # one tile: the product is the output
        return F.linear(x, dequantize(*args, out=scratch, row_palette=row_palette))
    y = torch.empty(rows, n, dtype=x.dtype)  # contiguous, as attention's fast kernels want q, k, v
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        w = dequantize(*args, slice(start, stop), scratch[: stop - start], row_palette=row_palette)
        y[:, start:stop] = F.linear(x, w)
    return y
