"""`DecodeLinear`: an `nn.Linear` whose forward takes the CPU GEMV kernel at decode-sized batches, and
oneDNN's prepacked bfloat16 product above them.

The same parameters, the same state_dict and, up to float rounding, the same outputs as `nn.Linear`; only
the kernel differs: the GEMV when `kernels.cpu_gemv.uses_kernel` says it wins (a few rows, CPU weights,
no autograd), the packed weight (`prepack_bf16`) for more rows of a bfloat16 layer while the weight is
unchanged, `F.linear` otherwise. The engine swaps it in on CPU (`EngineConfig.cpu_gemv`,
`EngineConfig.cpu_prepack`); training never sees it take a kernel, because gradients are on there.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels.autodiff import differentiating
from effllm.kernels.cpu_gemv import linear, uses_kernel
from effllm.kernels.cpu_packed_linear import PackedWeight, packed_bf16_available


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("packed")
        if (
            packed is not None
            and x.dtype == torch.bfloat16
            and not torch.is_grad_enabled()
            and not differentiating(x)
            and packed.matches(self.weight)
            and not uses_kernel(x, self.weight)
        ):
            return packed.linear(x, self.bias)
        return linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `DecodeLinear` in place (its tensors untouched); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            count += 1
    return count


def prepack_bf16(model: nn.Module) -> int:
    """Give every bfloat16 CPU `DecodeLinear` of `model` (fused projections included) a oneDNN-packed copy of
    its weight; returns how many (0 where this CPU or torch has no oneDNN bfloat16)."""
    if not packed_bf16_available():
        return 0
    modules = list(model.modules())
    for module in list(modules):
        modules += [m for m in module.__dict__.values() if isinstance(m, DecodeLinear)]  # fused projections
    fused_parts = {id(p) for m in modules for p in m.__dict__.get("parts", ())}  # the fused module runs them
    count = 0
    for module in {id(m): m for m in modules if id(m) not in fused_parts}.values():
        w = getattr(module, "weight", None)
        if isinstance(module, DecodeLinear) and w.dtype == torch.bfloat16 and w.device.type == "cpu":
            module.__dict__["packed"] = PackedWeight(w)
            count += 1
    return count
