"""GradNormLoRP: weight-normalised reparameterisation plus low-rank gradient projection.

Huang et al., "Gradient Weight-normalized Low-rank Projection for Efficient LLM Training" (AAAI 2025).
Implemented from the paper. The public code deviates from it (its `LowRankWeightNormAdamW` drops the
(I - v̂v̂ᵀ) term of ∇_V and keeps a full-size copy of V; its `wadamw.py` keeps full-size Adam state).
"""

from typing import Any

import torch

from effllm.optim.galore import GaLoreAdamW

_TINY = torch.finfo(torch.float32).tiny


class GradNormLoRPAdamW(GaLoreAdamW):
    """AdamW on a weight-normalised reparameterisation, with GaLore-style projection of ∇_V.

    Each matrix of a group with `rank` is trained as W = M ⊙ V/‖V‖_c (weight normalisation,
    w = δ·v/‖v‖ per output neuron; the paper's W = M (W₀+IJ)/‖W₀+IJ‖_c where W₀+IJ is V after a
    stretch of low-rank updates). With G = ∇_W L and v̂ = V/‖V‖_c row by row (Salimans & Kingma 2016, eq. 3):
        ∇_M L = ⟨G, v̂⟩                          (per output neuron)
        D     = ∇_V L = (M/‖V‖_c) ⊙ (I − v̂ v̂ᵀ) G
        D̃     = U η(Uᵀ D V) Vᵀ                   (the paper's projected step: U, V from the SVD of D,
                                                  refreshed every `update_proj_gap` steps; η is Adam)
        V ← V − lr·scale·D̃,   M ← (1 − lr·λ) M − lr·Adam(∇_M L),   W ← M ⊙ V/‖V‖_c
    The default `proj_type` is therefore "full" (both sides, r×r moments); the others are allowed.

    Memory: V is never stored. Since W = M ⊙ v̂, the direction is read off W, and V = ‖V‖_c ⊙ v̂ needs
    only the per-neuron norms ‖V‖_c; the state per matrix is M and ‖V‖_c (one float per output neuron
    each), the projection bases and the low-rank moments, so the optimizer memory stays GaLore's.
    "Neuron" is a row of torch's [out, in] weight (a column in the paper's W ∈ R^{in×out}). Weight
    decay multiplies M, which is exactly decaying W. A row that is exactly zero has no direction and
    stays zero. Groups without `rank` are plain AdamW.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; low-rank groups default to the paper's two-sided projection."""
        if "rank" in param_group:
            param_group.setdefault("proj_type", "full")
        super().add_param_group(param_group)

    def _step_matrix(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        dtype = torch.promote_types(p.dtype, torch.float32)  # normalise in at least float32
        if "magnitude" not in state:
            norms = p.detach().to(dtype).norm(dim=1)
            state["magnitude"] = norms.clone()  # M; V starts as W, so ‖V‖_c = M
            state["direction_norm"] = norms
        magnitude, direction_norm = state["magnitude"], state["direction_norm"]
        sign = torch.where(magnitude < 0, -1.0, 1.0)
        unit = p.detach().to(dtype, copy=True)  # v̂ [out, in]
        unit.div_(unit.norm(dim=1, keepdim=True).clamp_min(_TINY)).mul_(sign[:, None])
        grad = p.grad.to(dtype)
        grad_magnitude = (grad * unit).sum(dim=1)
        grad_direction = torch.addcmul(grad, unit, grad_magnitude[:, None], value=-1.0)
        grad_direction.mul_((magnitude / direction_norm.clamp_min(_TINY))[:, None])

        projector = self.projector(group)
        self._maybe_refresh(projector, grad_direction, group, state)
        low_rank = projector.project(grad_direction, state)
        del grad, grad_direction
        state["step"] += 1
        step_direction = projector.project_back(self._adam(state, "", low_rank, group), state)
        step_magnitude = self._adam(state, "magnitude_", grad_magnitude, group)

        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay:
            magnitude.mul_(1.0 - lr * weight_decay)
        magnitude.sub_(step_magnitude, alpha=lr)
        direction = unit.mul_(direction_norm[:, None]).sub_(step_direction.to(dtype), alpha=lr)  # V_{t+1}
        direction_norm.copy_(direction.norm(dim=1))
        p.copy_(direction.mul_((magnitude / direction_norm.clamp_min(_TINY))[:, None]))
