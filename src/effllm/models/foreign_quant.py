"""Reading GPTQ and AutoAWQ checkpoints: their tensors load as they are stored, then become `QuantizedLinear`.

`load_model` reads a checkpoint whose config.json has `quantization_config.quant_method` "gptq" or "awq"
through the layouts below: each targeted linear becomes a `StoredQuantLinear` that owns the file's tensors
(so the loader reads them straight into place), and `finalize` then converts each one, once, to the
compressed-tensors layout EffLLM runs (`QuantizedLinear`, 4-bit, asymmetric, groups), rewriting the model's
`quantization_config` to match: a loaded model saves as compressed-tensors.

GPTQ (AutoGPTQ / GPTQModel, `checkpoint_format` "gptq" = v1 unless it says "gptq_v2"):
  qweight int32 [K/8, N], packed along K (column k's code is nibble k % 8 of word k // 8, low bits first);
  qzeros int32 [G, N/8], packed along N; v1 stores each zero minus one; scales [G, N]; g_idx int32 [K].
  W[n, k] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k]. Only g_idx = k // group_size is
  supported (act-order checkpoints whose groups are not contiguous are refused).
AWQ (AutoAWQ "gemm"): qweight int32 [K, N/8] and qzeros int32 [G, N/8], packed along N in the interleaved
  order [0, 2, 4, 6, 1, 3, 5, 7] (nibble p of a word holds column 8j + ORDER[p]); scales [G, N];
  W[n, k] = scales[k // group_size, n] * (q[k, n] - z[k // group_size, n]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effllm.core.errors import CheckpointError
from effllm.models.layouts import register_layout, swap_modules
from effllm.models.quantized_linear import QuantizedLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p holds column ORDER[p] of its group of 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> unsigned codes [8R, C]: word (r, c) holds rows 8r .. 8r + 7 (GPTQ's qweight)."""
    u = (packed.unsqueeze(1) >> _SHIFTS.view(1, 8, 1)) & 0xF
    return u.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 [R, C] -> unsigned codes [R, 8C]: nibble p of word (r, c) is column 8c + order[p]."""
    u = (packed.unsqueeze(-1) >> _SHIFTS) & 0xF  # [R, C, 8] by nibble position
    out = torch.empty_like(u)
    out[..., list(order)] = u
    return out.reshape(packed.shape[0], -1)


class StoredQuantLinear(nn.Module):
    """A GPTQ or AWQ linear layer as its checkpoint stores it; `to_runtime()` gives the QuantizedLinear."""

    def __init__(self, linear: nn.Linear, method: str, group_size: int, v1_zeros: bool, has_g_idx: bool):
        super().__init__()
        k, n = linear.in_features, linear.out_features
        if group_size == -1:
            group_size = k
        if k % group_size or k % 8 or n % 8:
            raise CheckpointError(
                f"a {method} layer of {n}x{k} with group size {group_size} cannot be read "
                "(needs in_features divisible by the group size and by 8, out_features by 8)"
            )
        self.in_features, self.out_features, self.method = k, n, method
        self.group_size, self.v1_zeros = group_size, v1_zeros
        groups, device = k // group_size, linear.weight.device
        qweight_shape = (k // 8, n) if method == "gptq" else (k, n // 8)
        self.register_buffer("qweight", torch.empty(qweight_shape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, n // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, n, dtype=linear.weight.dtype, device=device))
        if has_g_idx:
            self.register_buffer("g_idx", torch.empty(k, dtype=torch.int32, device=device))
        self.bias = linear.bias

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(unsigned codes [N, K], unsigned zeros [N, G])."""
        if self.method == "gptq":
            q = unpack_rows(self.qweight).t()
            z = unpack_columns(self.qzeros).t() + (1 if self.v1_zeros else 0)
            g_idx = getattr(self, "g_idx", None)
            expected = torch.arange(self.in_features, device=q.device) // self.group_size
            if g_idx is not None and not torch.equal(g_idx.long(), expected):
                raise CheckpointError(
                    "this GPTQ checkpoint uses act-order groups (g_idx not k // group_size), which EffLLM "
                    "cannot run; re-quantize without desc_act or with static groups"
                )
        else:
            q = unpack_columns(self.qweight, AWQ_ORDER).t()
            z = unpack_columns(self.qzeros, AWQ_ORDER).t()
        if (z > 15).any():
            raise CheckpointError(f"{self.method} zero points exceed 4 bits; is checkpoint_format right?")
        return q.contiguous(), z.contiguous()

    def to_runtime(self) -> QuantizedLinear:
        q, z = self.codes()
        module = QuantizedLinear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            4,
            self.group_size,
            False,
            dtype=self.scales.dtype,
            device=self.scales.device,
        )
        module.set_codes((q - 8).to(torch.int8), self.scales.t().contiguous(), (z - 8).to(torch.int8))
        if self.bias is not None:
            module.bias = self.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # before finalize (never in load_model's result)
        return self.to_runtime()(x)


def _builder(method: str):
    def build(model: nn.Module, section: dict[str, Any]) -> None:
        bits = section.get("bits", section.get("w_bit", 4))
        if bits != 4:
            raise CheckpointError(
                f"{method} checkpoints of {bits} bits are not supported; EffLLM reads 4-bit ones"
            )
        if method == "awq" and section.get("version", "gemm").lower() != "gemm":
            raise CheckpointError(
                f"AWQ version {section.get('version')!r} is not supported; EffLLM reads 'gemm'"
            )
        group = section.get("group_size", section.get("q_group_size", 128))
        v1 = method == "gptq" and section.get("checkpoint_format", "gptq") != "gptq_v2"
        if method == "awq" and not section.get("zero_point", True):
            raise CheckpointError("AWQ checkpoints without zero points are not supported")
        skip = list(section.get("modules_to_not_convert") or []) + ["lm_head"]

        def replace(name: str, module: nn.Module) -> nn.Module | None:
            if type(module) is not nn.Linear or any(name == s or name.endswith("." + s) for s in skip):
                return None
            return StoredQuantLinear(module, method, group, v1, has_g_idx=method == "gptq")

        swap_modules(model, replace)

    return build


register_layout("gptq")(_builder("gptq"))
register_layout("awq")(_builder("awq"))


def finalize(model: nn.Module) -> bool:
    """Convert every loaded `StoredQuantLinear` to `QuantizedLinear` and restate the quantization_config as
    compressed-tensors; returns whether anything was converted."""
    converted = swap_modules(
        model, lambda name, m: m.to_runtime() if isinstance(m, StoredQuantLinear) else None
    )
    if not converted:
        return False
    example = model.get_submodule(converted[0])
    dense = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    model.config.quantization_config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "group",
                    "group_size": example.group_size,
                    "dynamic": False,
                    "actorder": None,
                    "block_structure": None,
                    "observer": "minmax",
                    "observer_kwargs": {},
                },
            }
        },
        "ignore": dense,
        "kv_cache_scheme": None,
    }
    return True
