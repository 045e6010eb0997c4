"""`DecodeLinear`: an `nn.Linear` whose forward takes the CPU GEMV kernel at decode-sized batches.

The same parameters, the same state_dict and, up to float rounding, the same outputs as `nn.Linear`; only
the kernel differs, and only when `kernels.cpu_gemv.uses_kernel` says it wins (a few rows, CPU weights,
no autograd). The engine swaps it in on CPU (`EngineConfig.cpu_gemv`); training never sees it take the
kernel, because gradients are on there.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels.cpu_gemv import linear


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `DecodeLinear` in place (its tensors untouched); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            count += 1
    return count
