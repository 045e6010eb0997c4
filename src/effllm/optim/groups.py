"""How a model's parameters split into optimizer groups: low-rank matrices, decayed, not decayed."""

from collections.abc import Iterable, Sequence
from typing import Any

import torch

# galore-torch's recipe: the 2-D weights of attention and MLP linears get the low-rank projection.
LOW_RANK_TARGETS = ("self_attn", "mlp")


def split_param_groups(
    named_params: Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    low_rank: dict[str, Any] | None = None,
    targets: Sequence[str] = LOW_RANK_TARGETS,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Groups of (name, parameter) pairs, empty groups left out.

    With `low_rank` (GaLore keys such as `rank`, `update_proj_gap`), 2-D parameters whose name contains
    one of `targets` form the low-rank group. Other matrices (embeddings, head) get `weight_decay`;
    1-D parameters (norms, biases) get none, as in MeZO and most LLM recipes. `trainable_only` skips
    parameters with `requires_grad=False`; layer sampling passes False because it freezes and unfreezes
    blocks after the optimizer exists.
    """
    low, decayed, not_decayed = [], [], []
    for name, p in named_params:
        if trainable_only and not p.requires_grad:
            continue
        if low_rank is not None and p.dim() == 2 and any(t in name for t in targets):
            low.append((name, p))
        elif p.dim() >= 2:
            decayed.append((name, p))
        else:
            not_decayed.append((name, p))
    groups = [
        {"params": low, "weight_decay": weight_decay, **(low_rank or {})},
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
