"""`--method dkm`: train with DKM weight clustering, ending with a palettized model (`compress/dkm.py`).

    effllm train --model M --data D --out runs/dkm --method dkm --dkm-bits 3 [--dkm-tau 1e-4 --dkm-iters 3]

Every decoder linear's weight is seen through DKM's differentiable clustering while the model trains (its
2^bits centroids initialised by k-means on the starting weights and refined inside each forward), so the
weights learn to sit near a palette. The run writes the finalised model: each of those weights snapped to
its nearest centroid, so every matrix holds at most 2^bits distinct values (embeddings, norms and the head
keep full precision). Checkpoints hold the weights and centroids and resume exactly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from effllm.compress.dkm import apply_dkm, finalize_dkm


def prepare_dkm(model: nn.Module, cfg: Any) -> nn.Module:
    apply_dkm(model, cfg.dkm_bits, cfg.dkm_tau, cfg.dkm_iters, seed=cfg.seed)
    return model


class DKMTraining:
    """The callback: the final model is the palettized one."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def final_model(self, model: nn.Module) -> nn.Module:
        counts = finalize_dkm(model)
        most = max(counts.values()) if counts else 0
        self.trainer._print(
            f"DKM: {len(counts)} weight matrices palettized, at most {most} distinct values each "
            f"({self.trainer.config.dkm_bits} bits)"
        )
        return model
