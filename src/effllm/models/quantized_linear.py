"""`QuantizedLinear`: a linear layer whose weight is stored as compressed-tensors stores it, and its layout.

The module's persistent tensors are exactly the checkpoint's (compressed-tensors, the format vLLM and
llm-compressor read), so a quantized model saves and loads like any other and nothing is repacked:

- weight-only (`W4A16`, `W8A16`; format `pack-quantized`): `weight_packed` int32 [N, K * bits / 32] holding
  the codes q + 2^(bits-1) little-endian along K, `weight_scale` [N, G], `weight_shape` int32 [2], and for
  asymmetric grids `weight_zero_point` int32 [ceil(N * bits / 32), G] (packed the same way along N).
- `W8A8` (format `int-quantized`): `weight` int8 [N, K] and `weight_scale` [N, 1]; activations are
  quantized per token, symmetric, at run time.

`forward` takes the CPU kernels of `kernels.cpu_quant_gemv` at decode-sized batches (few rows, no
autograd) and otherwise the reference path: dequantize to the activation dtype, then `F.linear` (W8A8 also
rounds the activations per token first, so both paths compute the same function). The layout
"compressed-tensors" rebuilds these modules from config.json's `quantization_config` on load.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import CheckpointError
from effllm.kernels import cpu_quant_gemv, triton_quant_gemm
from effllm.models.layouts import register_layout, swap_modules


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' packing: signed codes (int8) + 2^(bits-1), 32 / bits per int32 along `dim`
    (0 or 1), lowest bits first, the last word zero-padded."""
    per_word = 32 // bits
    u = (codes.to(torch.int32) + (1 << (bits - 1))) & ((1 << bits) - 1)
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    u = F.pad(u, (0, math.ceil(cols / per_word) * per_word - cols))
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    packed = (u.reshape(rows, -1, per_word) << shifts).sum(-1, dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.t().contiguous() if dim == 0 else packed.contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """The signed int8 codes [N, K] (`shape`) that `pack_int32(codes, bits, dim)` packed."""
    per_word = 32 // bits
    p = packed.t() if dim == 0 else packed
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    u = (p.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(p.shape[0], -1)
    rows, cols = (shape[1], shape[0]) if dim == 0 else shape
    codes = (u[:rows, :cols] - (1 << (bits - 1))).to(torch.int8)
    return codes.t().contiguous() if dim == 0 else codes


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held in `bits`-bit codes (groups of `group_size` columns, or per channel)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int | None,
        symmetric: bool = True,
        activation_bits: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8) or activation_bits not in (8, 16):
            raise ValueError(f"unsupported grid: {bits}-bit weights with {activation_bits}-bit activations")
        if activation_bits == 8 and (bits != 8 or group_size is not None or not symmetric):
            raise ValueError("8-bit activations need symmetric 8-bit weights per channel")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.activation_bits = activation_bits
        groups = 1 if group_size is None else in_features // group_size
        factory = {"device": device}
        float_dtype = dtype or torch.get_default_dtype()
        if activation_bits == 8:
            self.register_buffer(
                "weight", torch.empty(out_features, in_features, dtype=torch.int8, **factory)
            )
        else:
            words = math.ceil(in_features * bits / 32)
            self.register_buffer(
                "weight_packed", torch.empty(out_features, words, dtype=torch.int32, **factory)
            )
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int32))
            if not symmetric:
                zero_words = math.ceil(out_features * bits / 32)
                self.register_buffer(
                    "weight_zero_point", torch.empty(zero_words, groups, dtype=torch.int32, **factory)
                )
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=float_dtype, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=float_dtype, **factory)) if bias else None
        self._runtime: tuple | None = None  # (key, kernel call) computed from the buffers on first use
        self._zero_codes: tuple | None = None  # (key, unpacked zero codes)

    @classmethod
    def like(cls, linear: nn.Linear, **grid: Any) -> QuantizedLinear:
        """An empty module (same device, dtype and bias as `linear`) for the grid `grid`."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
            **grid,
        )

    def extra_repr(self) -> str:
        grid = "per channel" if self.group_size is None else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"W{self.bits}A{self.activation_bits} {grid} {kind}"
        )

    # --- the codes -------------------------------------------------------------------------------------
    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Store signed codes q [N, K], scales [N, G] and zeros [N, G] (None when symmetric)."""
        if (zero is None) != self.symmetric:
            raise ValueError("zero points are given exactly when the grid is asymmetric")
        dtype = self.weight_scale.dtype
        if self.activation_bits == 8:
            self.weight = q.to(torch.int8).contiguous()
        else:
            self.weight_packed = pack_int32(q, self.bits)
            if zero is not None:
                self.weight_zero_point = pack_int32(zero.round().to(torch.int8), self.bits, dim=0)
        self.weight_scale = scale.to(dtype).reshape(self.out_features, -1).contiguous()
        self._runtime = self._zero_codes = None

    def codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(signed int8 codes [N, K], int8 zero points [N, G] or None)."""
        shape = (self.out_features, self.in_features)
        if self.activation_bits == 8:
            return self.weight, None
        q = unpack_int32(self.weight_packed, self.bits, shape)
        if self.symmetric:
            return q, None
        zero_shape = (self.out_features, self.weight_scale.shape[1])
        return q, unpack_int32(self.weight_zero_point, self.bits, zero_shape, dim=0)

    def dequantized_weight(
        self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight [N, K] as floats: through the C kernel on CPU when it is built (into `out` when
        given), else in PyTorch."""
        call = self._kernel_call() if dtype in (torch.float32, torch.bfloat16) else None
        if call is not None:
            scale, zero = call[3][0], (self.zero_codes() if self.bits == 4 else None)
            if out is None:
                out = torch.empty(self.out_features, self.in_features, dtype=dtype)
            codes = self.weight if self.activation_bits == 8 else self.weight_packed
            offset = 0 if self.activation_bits == 8 else 128
            cpu_quant_gemv.library().dequantize_rows(
                codes.data_ptr(),
                self.bits,
                offset,
                scale.data_ptr(),
                int(scale.dtype == torch.bfloat16),
                None if zero is None else zero.data_ptr(),
                out.data_ptr(),
                int(dtype == torch.bfloat16),
                self.out_features,
                self.in_features,
                self.group_size or self.in_features,
                torch.get_num_threads(),
            )
            return out
        return self.reference_weight(dtype)

    def reference_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] dequantized in PyTorch from the stored codes: (q - z) * s."""
        q, zero = self.codes()
        n, k = q.shape
        groups = q.float().reshape(n, self.weight_scale.shape[1], -1)
        if zero is not None:
            groups = groups - zero.float().unsqueeze(-1)
        return (groups * self.weight_scale.float().unsqueeze(-1)).reshape(n, k).to(dtype)

    def zero_codes(self) -> torch.Tensor | None:
        """Unsigned zero codes [N, G] (uint8, z + 2^(bits-1)) of an asymmetric grid, as the kernels read
        them; unpacked once per stored tensor. None when symmetric."""
        if self.symmetric:
            return None
        key = self.weight_zero_point.data_ptr()
        if self._zero_codes is None or self._zero_codes[0] != key:
            codes = (self.codes()[1].to(torch.int16) + (1 << (self.bits - 1))).to(torch.uint8).contiguous()
            self._zero_codes = (key, codes)
        return self._zero_codes[1]

    # --- forward ---------------------------------------------------------------------------------------
    def _kernel_call(self):
        """(kernel, arguments between x and y, arguments after M, tensors they point into) for the compiled
        kernel, rebuilt when the buffers change; None without the library or for a layer it cannot take."""
        scale = self.weight_scale
        key = (scale.data_ptr(), 0 if scale.is_inference() else scale._version)
        if self._runtime is not None and self._runtime[0] == key:
            return self._runtime[1]
        call = None
        if cpu_quant_gemv.available() and self.weight_scale.device.type == "cpu":
            scale = self.weight_scale.contiguous()
            if scale.dtype not in (torch.float32, torch.bfloat16):
                scale = scale.float()
            lib, bf16 = cpu_quant_gemv.library(), int(scale.dtype == torch.bfloat16)
            n, k = self.out_features, self.in_features
            if self.activation_bits == 8:
                rowsum = self.weight.sum(1, dtype=torch.int32).contiguous()
                call = (
                    lib.gemv_w8a8,
                    (self.weight.data_ptr(), scale.data_ptr(), bf16, rowsum.data_ptr()),
                    (n, k),
                    (scale, rowsum),
                )
            elif self.bits == 4 and (self.group_size or k) % 32 == 0:
                zero = self.zero_codes()
                call = (
                    lib.gemv_w4,
                    (
                        self.weight_packed.data_ptr(),
                        scale.data_ptr(),
                        bf16,
                        None if zero is None else zero.data_ptr(),
                    ),
                    (n, k, self.group_size or k),
                    (scale, zero),
                )
            elif self.bits == 8:
                call = (
                    lib.gemv_w8,
                    (self.weight_packed.data_ptr(), scale.data_ptr(), bf16),
                    (n, k),
                    (scale,),
                )
        self._runtime = (key, call)
        return call

    def uses_kernel(self, rows: int) -> bool:
        return (
            rows <= cpu_quant_gemv.MAX_ROWS[self.bits, self.activation_bits]
            and not torch.is_grad_enabled()
            and self._kernel_call() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= cpu_quant_gemv.MAX_ROWS[self.bits, self.activation_bits] and not torch.is_grad_enabled():
            call = self._kernel_call()
            if call is not None:
                fn, before, after, _ = call
                x2 = x.reshape(rows, self.in_features)
                if x2.dtype not in (torch.float32, torch.bfloat16):
                    x2 = x2.to(torch.float32)
                x2 = x2.contiguous()
                y = torch.empty(rows, self.out_features, dtype=x2.dtype)
                io_bf16 = int(x2.dtype == torch.bfloat16)
                fn(x2.data_ptr(), *before, y.data_ptr(), rows, *after, io_bf16, torch.get_num_threads())
                if self.bias is not None:
                    y += self.bias
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.device.type == "cuda" and self.activation_bits == 16 and triton_quant_gemm.available():
            return self.triton_forward(x)
        return self.reference_forward(x)

    def triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton dequantize-GEMM (CUDA; on CPU tensors only under Triton's interpreter)."""
        zero = self.zero_codes()
        x2 = x.reshape(-1, self.in_features)
        y = triton_quant_gemm.quant_gemm(
            x2, self.weight_packed, self.weight_scale, zero, self.bits, self.group_size or self.in_features
        )
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then `F.linear` (W8A8: activations rounded per token to int8 first)."""
        if self.activation_bits == 8:
            x = fake_quantize_per_token(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        scratch = None
        if not torch.is_grad_enabled() and self.weight_scale.device.type == "cpu":
            scratch = _scratch((self.out_features, self.in_features), x.dtype)  # no allocation per call
        return F.linear(x, self.dequantized_weight(x.dtype, scratch), bias)


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for dequantized weights of one shape, reused call after call: allocating a fresh
    multi-megabyte tensor per call costs page faults that take as long as the dequantization."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (shape, dtype)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype)
    return buffers[key]


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per row (symmetric, the row's max |x| maps to 127), returned dequantized."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(xf * (1 / scale)).clamp(-127, 127) * scale).to(x.dtype)  # as the C kernel rounds


# --- the layout: config.json's quantization_config -> modules ------------------------------------------
def grid_of(scheme: dict[str, Any]) -> dict[str, Any]:
    """QuantizedLinear's grid arguments from one compressed-tensors config group (its weights and inputs)."""
    weights = scheme.get("weights") or {}
    inputs = scheme.get("input_activations")
    if weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8):
        raise CheckpointError(
            f"compressed-tensors weights {weights.get('type')} {weights.get('num_bits')}-bit are not supported; "
            "EffLLM reads int 4- and 8-bit weights"
        )
    strategy = weights.get("strategy", "channel")
    if strategy not in ("group", "channel"):
        raise CheckpointError(
            f"compressed-tensors weight strategy {strategy!r} is not supported (group, channel)"
        )
    if weights.get("actorder") not in (None, "static", False) or weights.get("block_structure"):
        raise CheckpointError(
            "compressed-tensors activation-order (g_idx) or block-structured weights are not supported"
        )
    grid = {
        "bits": weights["num_bits"],
        "group_size": weights.get("group_size") if strategy == "group" else None,
        "symmetric": bool(weights.get("symmetric", True)),
        "activation_bits": 16,
    }
    if inputs:
        if inputs.get("num_bits") != 8 or not inputs.get("dynamic") or inputs.get("strategy") != "token":
            raise CheckpointError(
                "compressed-tensors input activations other than dynamic int8 per token are not supported"
            )
        grid["activation_bits"] = 8
    return grid


def _matches(name: str, patterns: list[str]) -> bool:
    import re

    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


@register_layout("compressed-tensors")
def build_compressed_tensors(model: nn.Module, section: dict[str, Any]) -> None:
    """Swap each targeted `nn.Linear` for a `QuantizedLinear` of its config group's grid."""
    fmt = section.get("format")
    if fmt not in ("pack-quantized", "int-quantized"):
        raise CheckpointError(
            f"compressed-tensors format {fmt!r} is not supported; EffLLM reads pack-quantized and int-quantized"
        )
    groups = list((section.get("config_groups") or {}).values())
    if not groups:
        raise CheckpointError("compressed-tensors quantization_config has no config_groups")
    ignore = list(section.get("ignore") or [])

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Linear or _matches(name, ignore):
            return None
        for group in groups:
            targets = group.get("targets") or []
            if "Linear" in targets or _matches(name, [t for t in targets if t != "Linear"]):
                return QuantizedLinear.like(module, **grid_of(group))
        return None

    swap_modules(model, replace)
