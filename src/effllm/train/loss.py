"""The training objective: next-token cross-entropy, summed over the tokens that carry a label.

A loss function takes (model, batch) and returns the *sum* over target tokens; the trainer divides by
the number of targets in the whole global batch, so accumulation and data parallelism give the mean
over exactly the tokens a single large batch would average. A method that changes the objective
(distillation, unlearning) passes its own function with this signature to the `Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effllm.train.packing import IGNORE_INDEX

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of -log p(label) over positions whose label is not IGNORE_INDEX."""
    logits = model(batch["input_ids"])  # [B, T, V]
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
