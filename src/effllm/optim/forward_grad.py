"""Forward-gradient SGD: a directional derivative by forward-mode AD instead of finite differences.

Baydin et al., "Gradients without Backpropagation" (2022), as benchmarked in ZO-Bench (`forward_grad`).
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from effllm.core.errors import ConfigError
from effllm.optim.forward_only import ForwardOnlyOptimizer, gaussian_directions


class ForwardGradSGD(ForwardOnlyOptimizer):
    """θ ← θ − lr·((∇L·v)·v + λθ) with v ~ N(0, I), where ∇L·v comes from one `torch.func.jvp`.

    (∇L·v)·v is an unbiased estimate of ∇L (Baydin et al.'s forward gradient). The jvp carries one tangent per
    parameter through a single forward pass: no backward and no stored activations, but a tangent the
    size of the parameters (forward-grad sits between ZO and backprop in memory, as ZO-Bench measured).

    The closure takes the parameters: forward-mode AD must substitute dual tensors for them, so the
    optimizer calls `closure(params)` with `params` a dict from parameter name to tensor, meant for
    `torch.func.functional_call`:

        opt = ForwardGradSGD(model.named_parameters(), lr=1e-4)   # names are required
        def closure(params):
            logits = torch.func.functional_call(model, params, (input_ids,))
            return loss_fn(logits, labels)
        loss = opt.step(closure)

    Hence `closure_takes_params = True`. Only trainable parameters are in `params`; the module supplies
    the rest. The closure must be deterministic (dropout off). The jvp runs with the math backend of
    `scaled_dot_product_attention`: the fused kernels implement no forward-mode derivative.
    """

    closure_takes_params = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, seed)
        if any("param_names" not in group for group in self.param_groups):
            raise ConfigError(
                "ForwardGradSGD needs parameter names for functional_call: pass model.named_parameters() "
                "(or groups of (name, parameter) pairs), or build it with build_optimizer(name, model, ...)"
            )
        self.directional_derivative: float | None = None

    def step(self, closure: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
        """One jvp through `closure(params)` and the update; returns the loss before the update."""
        self._require(closure)
        names, params = [], []
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"], strict=True):
                if p.requires_grad:
                    names.append(name)
                    params.append(p)
        tangents = tuple(gaussian_directions(params, self.next_seed()))

        def loss_of(*tensors: torch.Tensor) -> torch.Tensor:
            return closure(dict(zip(names, tensors, strict=True)))

        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode derivative
            loss, derivative = torch.func.jvp(loss_of, tuple(p.detach() for p in params), tangents)
        self.directional_derivative = float(derivative)
        with torch.no_grad():
            updates = dict(zip(params, tangents, strict=True))
            for group, p in self.trainable():
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(updates[p], alpha=-group["lr"] * self.directional_derivative)
        return loss.detach()
