"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to `min_ratio` of the peak."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupDecay:
    """The multiplier of the peak learning rate after `step` optimizer steps."""

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"  # cosine | linear | constant
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_ratio: float = 0.1,
) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict saves and restores the position."""
    return LambdaLR(optimizer, WarmupDecay(total_steps, warmup_steps, kind, min_ratio))


def restore_scheduler(scheduler: LambdaLR, state: dict) -> None:
    """Continue at the saved step, on the schedule the current options define (a run may be extended).

    The saved peak and shape would otherwise win: LambdaLR saves its base learning rates and lambda.
    """
    base_lrs, lambdas = list(scheduler.base_lrs), list(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)
    scheduler.base_lrs, scheduler.lr_lambdas = base_lrs, lambdas
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, lambdas, strict=True)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, base_lrs, lrs, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs
