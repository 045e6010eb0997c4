"""`QoQLinear`: QServe's W4A8 linear layer, 4-bit weights on QoQ's progressive grid, int8 activations.

The stored tensors (EffLLM's `qoq` layout; the format is documented in docs/compression.md):
- `qweight` uint8 [N, K/2]: unsigned 4-bit codes u, two per byte, column 2b in the low nibble of byte b
  (compressed-tensors' nibble order);
- `weight_scale` [N] float: s1, the per-channel step of the first level (int8, |W8| <= 119 at quantization);
- `group_scale` int8 [N, K/g] and `group_zero` uint8 [N, K/g]: the second level's integer step s2 and
  zero z per group of g columns, so the int8 weight is W8 = u * s2 - z * s2 (a multiply, then a
  subtraction: it stays in int8) and W = s1 * W8.

Activations are rounded per token to symmetric int8 (x8 with step sx). y = sx * s1 * (x8 . W8) + b: the
dot product is integer throughout. Decode-sized batches on CPU run `cpu/gemv_quant.c`'s `gemv_w4a8`
(VNNI; each group's dot product taken first and scaled once, MixPE's order); larger ones unpack W8 (per call, so
memory stays at 4 bits) and call `torch._int_mm` (oneDNN). Both are exact integer arithmetic, so they agree to float rounding of the
epilogue; `reference_forward` is the plain PyTorch statement of the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effllm.core.errors import CheckpointError
from effllm.kernels import cpu_quant_gemv
from effllm.models.layouts import register_layout, swap_modules
from effllm.models.quantized_linear import _matches


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K/2] uint8, column 2b in the low nibble of byte b."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 int8, step [M, 1] float32): symmetric, max |x| of a row to 127, as the C kernel."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    step = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(xf * (1 / step)).clamp(-127, 127).to(torch.int8), step


class QoQLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        factory = {"device": device}
        float_dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, **factory)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=float_dtype, **factory))
        self.register_buffer("group_scale", torch.empty(out_features, groups, dtype=torch.int8, **factory))
        self.register_buffer("group_zero", torch.empty(out_features, groups, dtype=torch.uint8, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=float_dtype, **factory)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, group_size: int = 128) -> QoQLinear:
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W4A8 QoQ group {self.group_size}"

    def set_codes(self, codes: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, zero: torch.Tensor) -> None:
        """Store codes u [N, K] (0..15), s1 [N], s2 [N, G] (integers 1..127) and zeros [N, G] (0..15)."""
        self.qweight = pack_nibbles(codes)
        self.weight_scale = s1.reshape(-1).to(self.weight_scale.dtype).contiguous()
        self.group_scale = s2.round().to(torch.int8).contiguous()
        self.group_zero = zero.round().to(torch.uint8).contiguous()

    def int8_weight(self) -> torch.Tensor:
        """W8 [N, K] int8 = u * s2 - z * s2 (group by group)."""
        u = unpack_nibbles(self.qweight).to(torch.int16)
        s2 = self.group_scale.to(torch.int16).repeat_interleave(self.group_size, dim=1)
        z = self.group_zero.to(torch.int16).repeat_interleave(self.group_size, dim=1)
        return (u * s2 - z * s2).to(torch.int8)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.int8_weight().float() * self.weight_scale.float()[:, None]).to(dtype)

    def _kernel_ready(self, rows: int) -> bool:
        return (
            rows <= cpu_quant_gemv.MAX_ROWS[4, 8]
            and self.in_features % 64 == 0
            and (self.group_size in (32, 64) or self.group_size % 128 == 0)
            and self.qweight.device.type == "cpu"
            and not torch.is_grad_enabled()
            and cpu_quant_gemv.available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        if self._kernel_ready(rows):
            x2 = (x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()).contiguous()
            scale = (
                self.weight_scale
                if self.weight_scale.dtype in (torch.float32, torch.bfloat16)
                else self.weight_scale.float()
            )
            y = torch.empty(rows, self.out_features, dtype=x2.dtype)
            cpu_quant_gemv.library().gemv_w4a8(
                x2.data_ptr(),
                self.qweight.data_ptr(),
                scale.data_ptr(),
                int(scale.dtype == torch.bfloat16),
                self.group_scale.data_ptr(),
                self.group_zero.data_ptr(),
                y.data_ptr(),
                rows,
                self.out_features,
                self.in_features,
                self.group_size,
                int(x2.dtype == torch.bfloat16),
                torch.get_num_threads(),
            )
        elif x.device.type == "cpu" and not torch.is_grad_enabled():
            x8, step = quantize_per_token(x2)
            acc = torch._int_mm(x8, self.int8_weight().t())  # unpacked per call: memory stays 4-bit
            y = acc.float() * step * self.weight_scale.float()
        else:
            return self.reference_forward(x)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token int8 activations times the dequantized weight, in float32 (exact for these integers)."""
        x8, step = quantize_per_token(x.reshape(-1, self.in_features))
        y = (x8.float() @ self.int8_weight().float().t()) * step * self.weight_scale.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


@register_layout("qoq")
def build_qoq(model: nn.Module, section: dict[str, Any]) -> None:
    """Swap every linear not in `ignore` for a `QoQLinear` of the section's group size."""
    group_size = section.get("group_size", 128)
    if not isinstance(group_size, int) or group_size < 2:
        raise CheckpointError(
            f"config.json's qoq group_size must be a positive even integer, got {group_size!r}"
        )
    ignore = list(section.get("ignore") or [])

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Linear or _matches(name, ignore):
            return None
        return QoQLinear.like(module, group_size)

    swap_modules(model, replace)
