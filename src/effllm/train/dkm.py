"""`--method dkm`: train with DKM weight clustering, ending with a palettized model (`compress/dkm.py`).

    effllm train --model M --data D --out runs/dkm --method dkm --dkm-bits 3 [--dkm-tau 1e-4 --dkm-iters 3]
                 [--dkm-edkm]

Every decoder linear's weight is seen through DKM's differentiable clustering while the model trains (its
2^bits centroids initialised by k-means on the starting weights and refined inside each forward), so the
weights learn to sit near a palette. The run writes the palettized model (`compress/palettize.py`): each
matrix as its learned centroids plus a `bits`-bit index per weight (the nearest centroid), EffLLM's
`palettized` layout, which every EffLLM command loads and runs with the lookup-table kernel (embeddings,
norms and the head keep full precision). Checkpoints hold the weights and centroids and resume exactly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from effllm.compress.dkm import DKMWeight, apply_dkm, dkm_targets
from effllm.compress.palettize import palettize_dkm_
from effllm.core.errors import ConfigError
from effllm.train.distributed import unwrap


def prepare_dkm(model: nn.Module, cfg: Any) -> nn.Module:
    for name, linear in dkm_targets(model).items():  # the run ends by writing them palettized: check now
        if linear.in_features % 32:
            raise ConfigError(
                f"--method dkm writes a palettized model, whose layers need inputs in multiples of 32; "
                f"{name} has {linear.in_features}"
            )
    apply_dkm(model, cfg.dkm_bits, cfg.dkm_tau, cfg.dkm_iters, seed=cfg.seed, edkm=cfg.dkm_edkm)
    return model


class DKMTraining:
    """The callback: the final model is the palettized one."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, step: int, metrics: dict) -> None:
        """With --dkm-edkm: the saved-tensor figures of the step's last DKM forward, summed over matrices."""
        stats = [
            m.last_saved
            for m in unwrap(self.trainer.model).modules()
            if isinstance(m, DKMWeight) and m.last_saved
        ]
        if stats:
            metrics["dkm_saved_mb"] = round(sum(s.saved_bytes for s in stats) / 1e6, 2)
            metrics["dkm_stored_mb"] = round(sum(s.stored_bytes for s in stats) / 1e6, 2)

    def final_model(self, model: nn.Module) -> nn.Module:
        counts = palettize_dkm_(model)
        self.trainer._print(
            f"DKM: {len(counts)} weight matrices palettized ({self.trainer.config.dkm_bits}-bit indices into "
            f"their palettes, {min(counts.values())} to {max(counts.values())} palette values used)"
        )
        return model
