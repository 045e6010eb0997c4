"""Whether a tensor is under differentiation that a C kernel would break.

The CPU kernels (`cpu_gemv`, `cpu_elementwise`, the packed linears) read raw storage and return plain
tensors: right for inference, wrong under autograd (no backward), under a `torch.func` transform such as
`jvp` or `vmap` (its tensors are wrappers without storage) and inside a `forward_ad` dual level (dual
tensors carry tangents a kernel would drop). Each kernel's dispatcher asks `differentiating` first.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad


def differentiating(*tensors: torch.Tensor) -> bool:
    """True under autograd for any of `tensors` (grad mode on and it requires grad), inside a torch.func
    transform or inside a forward-mode AD level."""
    return (
        any(torch.is_grad_enabled() and t.requires_grad for t in tensors)
        or torch._C._functorch.peek_interpreter_stack() is not None
        or forward_ad._current_level >= 0
    )
