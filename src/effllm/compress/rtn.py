"""Round-to-nearest integer quantization of weight matrices: the grid every method rounds onto.

A `QuantSpec` names the grid: `bits` (4 or 8), `group_size` (columns sharing one scale; None = one per
output channel) and `symmetric`. Codes are signed, as compressed-tensors stores them before packing:
symmetric codes lie in [-2^(b-1), 2^(b-1) - 1] with scale = max|w| / (2^(b-1) - 1) and no zero point;
asymmetric codes in the same range with an integer zero point z in it, scale = (max - min) / (2^b - 1), and
w ≈ (q - z) * scale. The group's range always includes 0, so zeros stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm.core.errors import InputError


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, name: str, weight_shape: tuple[int, int]) -> None:
        """Raise a one-line InputError when `weight_shape` [N, K] cannot take this grid."""
        n, k = weight_shape
        if self.group_size is not None and k % self.group_size:
            fits = [g for g in (32, 64, 128) if k % g == 0]
            hint = f"choose --group-size {' or '.join(map(str, fits))}" if fits else "skip the layer"
            raise InputError(
                f"{name}: in_features {k} is not divisible by group size {self.group_size}; {hint}"
            )
        if self.bits == 4 and (k % 32 or n % 16):
            raise InputError(
                f"{name}: 4-bit packing needs in_features divisible by 32 and out_features by 16 "
                f"(got {n}x{k}); quantize this layer to 8 bits or skip it"
            )


@dataclass
class QuantizedWeight:
    """Signed integer codes [N, K] (int8), scales [N, G] (float32) and, for asymmetric grids, zeros [N, G]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.spec).to(dtype)


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, spec.groups(k), k // spec.groups(k))


def quant_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [N, G], zero [N, G] or None) of the round-to-nearest grid for `w` [N, K], in float32."""
    g = _grouped(w.float(), spec)
    if spec.symmetric:
        scale = g.abs().amax(-1) / spec.qmax
        return scale.clamp_min(torch.finfo(torch.float32).tiny), None
    lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(torch.finfo(torch.float32).tiny)
    zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Signed int8 codes of `w` [N, K] on the grid (scale, zero) [N, G]: round(w / s) + z, clamped."""
    n, k = w.shape
    g = _grouped(w.float(), spec)
    q = torch.round(g / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8).reshape(n, k)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """float32 weights (q - z) * s from codes [N, K] and (scale, zero) [N, G]."""
    n, k = q.shape
    g = _grouped(q.float(), spec)
    if zero is not None:
        g = g - zero.float().unsqueeze(-1)
    return (g * scale.float().unsqueeze(-1)).reshape(n, k)


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of `w` [N, K]."""
    scale, zero = quant_params(w, spec)
    return QuantizedWeight(quantize(w, scale, zero, spec), scale, zero, spec)
