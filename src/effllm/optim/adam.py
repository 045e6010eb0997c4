"""The Adam direction, shared by every optimizer here that keeps Adam moments (full, low-rank or 8-bit)."""

import math

import torch


def adam_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    step: int,
) -> torch.Tensor:
    """Update the moments in place and return the bias-corrected step direction.

    Returns M̂/(√V̂ + ε) with M̂ = M/(1-β1^t), V̂ = V/(1-β2^t), as in GaLore's "Adam with GaLore"
    algorithm and in `torch.optim.AdamW` (ε is added after the bias correction of V), so that a
    projector equal to the identity reproduces AdamW. `step` is t, counted from 1.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    return exp_avg.div(denom).div_(bias_correction1)
