"""`PalettizedLinear`: a linear layer whose weights are indices into a small palette (DKM, k-means).

A palettized matrix holds at most 2^bits distinct values per palette, so it is stored as the palette and a
`bits`-bit index per weight. The stored tensors (EffLLM's `palettized` layout, docs/compression.md):
- `palette` float [N / R, 2^bits]: the values; palette j serves output rows j*R .. j*R + R - 1 (R =
  `rows_per_palette`; R = N is one palette per matrix, as DKM learns it);
- `planes` uint8 [N, K/32, 4 * bits]: the indices as bit planes, per block of 32 columns `bits`
  little-endian 32-bit words, bit j of word p being bit p of the index of column 32 b + j. A 3-bit matrix
  takes exactly 3 bits per weight; K must be a multiple of 32.

config.json says `"effllm": {"compression": {"format": "palettized", "bits": B, "rows_per_palette": R or
null, "ignore": [...]}}`; every `nn.Linear` not in `ignore` is palettized. On CPU, decode-sized batches run
`cpu/gemv_palette.c` (the weight looked up in a register, never written out), larger ones dequantize a tile
of rows at a time and multiply it there (memory stays at `bits` bits); `reference_forward` is the PyTorch statement of the
same. Inference only: the buffers take no gradient (train with DKM, then palettize).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import CheckpointError, ConfigError
from effllm.kernels import cpu_palette_gemv
from effllm.models.layouts import register_layout, swap_modules
from effllm.models.quantized_linear import _matches

MAX_BITS = 8


def pack_planes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices [N, K] (0 .. 2^bits - 1, K a multiple of 32) -> bit planes uint8 [N, K/32, 4 * bits]."""
    n, k = indices.shape
    idx = indices.to(torch.int32).view(n, k // 32, 4, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=indices.device)
    planes = [(((idx >> p) & 1) * weights).sum(-1) for p in range(bits)]  # each [N, K/32, 4]
    return torch.stack(planes, dim=2).reshape(n, k // 32, 4 * bits).to(torch.uint8).contiguous()


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """bit planes uint8 [N, K/32, 4 * bits] -> indices [N, K] (int64)."""
    n, blocks, width = planes.shape
    bits = width // 4
    shifts = torch.arange(8, dtype=torch.int32, device=planes.device)
    bit = (planes.to(torch.int32).view(n, blocks, bits, 4, 1) >> shifts) & 1  # [N, K/32, bits, 4, 8]
    place = (1 << torch.arange(bits, dtype=torch.int32, device=planes.device)).view(1, 1, bits, 1, 1)
    return (bit * place).sum(2).reshape(n, blocks * 32).long()


class PalettizedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        rows_per_palette: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        rows = out_features if rows_per_palette is None else rows_per_palette
        if not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"palettes take 1 to {MAX_BITS} bits, got {bits}")
        if in_features % 32:
            raise ConfigError(f"palettized layers need in_features a multiple of 32, got {in_features}")
        if rows < 1 or out_features % rows:
            raise ConfigError(f"rows per palette ({rows}) must divide the layer's {out_features} output rows")
        self.in_features, self.out_features, self.bits, self.rows_per_palette = (
            in_features,
            out_features,
            bits,
            rows,
        )
        factory = {"device": device}
        float_dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "planes", torch.empty(out_features, in_features // 32, 4 * bits, dtype=torch.uint8, **factory)
        )
        self.register_buffer(
            "palette", torch.empty(out_features // rows, 2**bits, dtype=float_dtype, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=float_dtype, **factory)) if bias else None
        # Fused q/k/v or gate/up (models/fused_projections) whose parts keep their own palettes: the palette
        # of each row (int32 [N]); not saved (a fused module lives outside the module tree).
        self.register_buffer("row_palette", None, persistent=False)

    @classmethod
    def like(cls, linear: nn.Linear, bits: int, rows_per_palette: int | None = None) -> PalettizedLinear:
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits,
            rows_per_palette,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit palette "
            f"per {self.rows_per_palette} rows"
        )

    def set_indices(self, indices: torch.Tensor, palette: torch.Tensor) -> None:
        """Store indices [N, K] (0 .. 2^bits - 1) and the palettes [N / R, 2^bits]."""
        if tuple(palette.shape) != tuple(self.palette.shape):
            raise ConfigError(
                f"palette shape {tuple(palette.shape)}, the layer needs {tuple(self.palette.shape)}"
            )
        if int(indices.min()) < 0 or int(indices.max()) >= 2**self.bits:
            raise ConfigError(f"palette indices must be in [0, {2**self.bits - 1}]")
        self.planes = pack_planes(indices, self.bits)
        self.palette = palette.to(self.palette.dtype).contiguous()

    def indices(self) -> torch.Tensor:
        return unpack_planes(self.planes)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K]: row n's values looked up in its palette (n // R, or row_palette[n])."""
        rows = self.palette_of_rows()
        weight = self.palette[rows[:, None], self.indices()]
        return weight.to(dtype or self.palette.dtype)

    def palette_of_rows(self) -> torch.Tensor:
        """Each row's palette index [N]."""
        if self.row_palette is not None:
            return self.row_palette.long()
        return torch.arange(self.out_features, device=self.planes.device) // self.rows_per_palette

    def _kernel_ready(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and self.planes.device.type == "cpu"
            and not torch.is_grad_enabled()
            and cpu_palette_gemv.available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_ready(x):
            return self.reference_forward(x)
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        x2 = (x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()).contiguous()
        palette = (
            self.palette if self.palette.dtype in (torch.float32, torch.bfloat16) else self.palette.float()
        )
        if rows <= cpu_palette_gemv.MAX_ROWS[x2.dtype]:
            y = cpu_palette_gemv.gemv(
                x2, self.planes, palette, self.bits, self.rows_per_palette, self.row_palette
            )
        else:  # dequantized a tile of rows at a time: memory stays at `bits` bits per weight
            y = cpu_palette_gemv.linear(
                x2, self.planes, palette, self.bits, self.rows_per_palette, self.row_palette
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def palettized_section(bits: int, rows_per_palette: int | None, ignore: list[str]) -> dict[str, Any]:
    """config.json's `effllm.compression` for a palettized model."""
    return {"format": "palettized", "bits": bits, "rows_per_palette": rows_per_palette, "ignore": ignore}


@register_layout("palettized")
def build_palettized(model: nn.Module, section: dict[str, Any]) -> None:
    """Swap every linear not in `ignore` for a `PalettizedLinear` of the section's bits and palette rows."""
    bits, rows = section.get("bits"), section.get("rows_per_palette")
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise CheckpointError(
            f"config.json's palettized bits must be an integer in [1, {MAX_BITS}], got {bits!r}"
        )
    if rows is not None and (not isinstance(rows, int) or rows < 1):
        raise CheckpointError(
            f"config.json's palettized rows_per_palette must be a positive integer or null, got {rows!r}"
        )
    ignore = list(section.get("ignore") or [])

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Linear or _matches(name, ignore):
            return None
        try:
            return PalettizedLinear.like(module, bits, rows)
        except ConfigError as e:
            raise CheckpointError(f"config.json's palettized layout does not fit {name}: {e}") from None

    swap_modules(model, replace)
