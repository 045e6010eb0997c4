"""Building blocks of the Llama-family decoder: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effllm.kernels import cpu_elementwise
from effllm.models.config import ModelConfig
from effllm.models.fused_projections import current


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as Llama does, for bf16 stability)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_elementwise.applies(x):  # inference on the CPU: one C pass, the same rounding
            out = cpu_elementwise.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.__dict__.get("fused_gate_up")  # models.fused_projections, in the engine
        if fused is not None and current(fused, self.gate_proj, self.up_proj) is not None:
            gate_up = fused(x)
            if fused.split_sizes[0] == fused.split_sizes[1] and cpu_elementwise.applies(
                gate_up
            ):  # inference, CPU
                h = cpu_elementwise.silu_mul(gate_up)
                if h is not None:
                    return self.down_proj(h)
            gate, up = gate_up.split(fused.split_sizes, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
