"""A whole decode step of a dense Llama-family decoder in one C call (`cpu/decode_step.c`).

`decode_step(...)` runs every layer over B single-token queries, updating the float32 residual stream x
[B, hidden] in place, and writes the step's keys and values into the paged cache. Its PyTorch reference
is the model's own layers over the same cache (what `engine/cpu_decode_step.py` is tested against).
Layer tensors are passed as per-layer pointer arrays (`LayerPointers`, built once per set of weights).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import cache

import torch

from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

MAX_ROWS = 16  # the kernel's MAX_ROWS_DOT: most queries per call
MAX_ROWS_AMX = 64  # its MAX_ROWS: dense bfloat16 weights where AMX runs the products (`decode_step_amx`)
KINDS = ("dense", "palettized", "w4", "w8", "w8a8")  # the kernel's W_KIND
_p, _pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
_ARGS = [_p, _p, _p, _p, _p] + [_pp] * 12 + [_p, _p, _p, _p, _pp, _pp, _p]


_FUNCTIONS = {
    "decode_step": (_ARGS, None),
    "decode_step_work": ([_p], ctypes.c_int64),
    "decode_step_dpbf16": ([], ctypes.c_int),
    "decode_step_amx": ([], ctypes.c_int),
}


def load_library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernel, built with extra compiler flags if given (-mno-avx512f: what other CPUs compile)."""
    return load_kernel("decode_step.c", _FUNCTIONS, flags=(*DEFAULT_FLAGS, "-fopenmp", *flags))


@cache
def _library() -> ctypes.CDLL | None:
    return load_library()


def decode_step_available() -> bool:
    return _library() is not None


def decode_step_dpbf16() -> bool:
    """Whether the compiled step has AVX-512 BF16 dot products (bfloat16 and 4-bit weights' fast paths)."""
    lib = _library()
    return lib is not None and bool(lib.decode_step_dpbf16())


def decode_step_amx() -> bool:
    """Whether the compiled step runs dense bfloat16 products of more than MAX_ROWS rows on AMX tiles (up
    to MAX_ROWS_AMX): AMX-BF16 on this CPU, and Linux granted the process the tile state."""
    lib = _library()
    return lib is not None and bool(lib.decode_step_amx())


def _array(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


@dataclass
class LayerPointers:
    """Per layer: fused q/k/v, o, fused gate/up and down weights [out, in] (float32 or bfloat16) with their
    float32 biases (or None), float32 norm weights, and the cache's k and v tensors. For palettized
    weights the weights are the bit planes (uint8), and `tables` / `row_palettes` hold, four per layer
    (q/k/v, o, gate/up, down), each matrix's palette table and int32 palette index per row (`kind`
    "palettized", `bits`); for symmetric 4-bit weights (`kind` "w4") the weights are the packed codes and
    `tables` the group scales [N, K / group] (`group`); for 8-bit weights per channel (`kind` "w8": the
    packed unsigned codes; "w8a8": int8 codes with `row_palettes` holding each row's int32 code sum) `tables`
    the per-row scales."""

    w_qkv: list[torch.Tensor]
    b_qkv: list[torch.Tensor | None]
    w_o: list[torch.Tensor]
    b_o: list[torch.Tensor | None]
    w_gu: list[torch.Tensor]
    b_gu: list[torch.Tensor | None]
    w_down: list[torch.Tensor]
    b_down: list[torch.Tensor | None]
    norm_in: list[torch.Tensor]
    norm_post: list[torch.Tensor]
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    kind: str = "dense"
    tables: list[torch.Tensor] = field(default_factory=list)
    row_palettes: list[torch.Tensor] = field(default_factory=list)
    bits: int = 0
    group: int = 0

    def __post_init__(self) -> None:
        extra = ("kind", "tables", "row_palettes", "bits", "group")
        self.arrays = [_array(getattr(self, f)) for f in self.__dataclass_fields__ if f not in extra]
        self.extra_arrays = [_array(self.tables), _array(self.row_palettes)]


def decode_step(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layers: LayerPointers,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    windows: torch.Tensor,
    *,
    num_heads: int,
    intermediate_size: int,
    eps: float,
    scale: float,
    threads: int,
    library: ctypes.CDLL | None = None,
) -> None:
    """Every layer of one decode step, in place on x [B, hidden] float32 (contiguous).

    cos, sin [B, head_dim] float32 at each query's position; slots [B] the cache slot of each query;
    block_tables [B, width], lens [B] (keys after this step) and windows [layers] (-1: none) int64.
    `library` is another build of the kernel (tests compare the portable one).
    """
    b, hidden = x.shape
    k0 = layers.k_cache[0]
    kv_heads, head_dim, block = k0.shape[2], k0.shape[3], k0.shape[1]
    max_keys = int(lens.max())
    w_bf16 = layers.w_qkv[0].dtype == torch.bfloat16
    dims = torch.tensor(
        [
            len(layers.w_qkv),
            hidden,
            num_heads,
            kv_heads,
            head_dim,
            intermediate_size,
            block,
            block_tables.shape[1],
            b,
            int(w_bf16),
            int(k0.dtype == torch.bfloat16),
            threads,
            max_keys,
            KINDS.index(layers.kind),
            layers.bits,
            int(bool(layers.tables) and layers.tables[0].dtype == torch.bfloat16),
            layers.group,
        ],
        dtype=torch.int64,
    )
    fparams = torch.tensor([eps, scale], dtype=torch.float32)
    lib = library or _library()
    work = torch.empty(lib.decode_step_work(dims.data_ptr()), dtype=torch.float32)
    lib.decode_step(
        dims.data_ptr(),
        fparams.data_ptr(),
        x.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        *layers.arrays,
        slots.data_ptr(),
        block_tables.data_ptr(),
        lens.data_ptr(),
        windows.data_ptr(),
        *layers.extra_arrays,
        work.data_ptr(),
    )
