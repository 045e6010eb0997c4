"""Natural GaLore: GaLore whose low-rank gradient is preconditioned by the inverse empirical Fisher.

Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning" (2024).
"""

from collections.abc import Iterable
from typing import Any

import torch

from effllm.core.errors import ConfigError
from effllm.optim.galore import GaLoreAdamW
from effllm.optim.projector import GaLoreProjector


def woodbury_natural_gradient(grad: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    """F̂⁻¹ g for the damped empirical Fisher F̂ = λI + Gᵀ G of the gradients in `history`.

    `grad` is g [d]; `history` is G [s, d], one past gradient per row (the paper's G_t = [g_t, ...,
    g_{t-s}] as columns, transposed). Woodbury's identity turns the d×d inverse into an s×s solve:
        F̂⁻¹ g = g/λ − Gᵀ S⁻¹ G g / λ²,    S = I + G Gᵀ/λ   (Cholesky; S is SPD with eigenvalues >= 1)
    """
    s = (
        torch.eye(history.shape[0], dtype=history.dtype, device=history.device)
        + history @ history.T / damping
    )
    z = torch.cholesky_solve((history @ grad)[:, None], torch.linalg.cholesky(s))[:, 0]
    return grad / damping - history.T @ z / damping**2


class NaturalGaLoreAdamW(GaLoreAdamW):
    """`GaLoreAdamW` with the natural-gradient transform on each projected gradient.

    For a low-rank group, each step (the paper's natural gradient transform):
        g_t = vec(project(G_t));  push g_t into a FIFO of the last s = `history_size` projected gradients
        g̃_t = (λI + Σ g_i g_iᵀ)⁻¹ g_t          # Woodbury, `woodbury_natural_gradient`
        then Adam on g̃_t and project back, as GaLore.
    The FIFO holds s vectors of the low-rank size (the memory the paper trades for speed). It is
    emptied when the projector refreshes: gradients projected on the old basis live in another
    subspace, so mixing them into the Fisher of the new one would be meaningless (the paper does not
    say; this is our choice). The transform is computed in float64: with λ = 1e-3 the two Woodbury terms
    nearly cancel, and float32 loses the result once ‖g‖²/λ is large. Groups without `rank` are AdamW.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        seed: int = 0,
        history_size: int = 20,
        damping: float = 1e-3,
    ):
        if history_size < 1 or damping <= 0:
            raise ConfigError(f"history_size must be >= 1 and damping > 0, got {history_size} and {damping}")
        self.history_size = history_size
        self.damping = damping
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed)

    def _maybe_refresh(
        self, projector: GaLoreProjector, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> bool:
        refreshed = super()._maybe_refresh(projector, grad, group, state)
        if refreshed:
            state["fisher_count"] = 0
        return refreshed

    def _precondition(
        self, low_rank_grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> torch.Tensor:
        g = low_rank_grad.reshape(-1)
        if "fisher_history" not in state:
            state["fisher_history"] = torch.zeros(
                self.history_size, g.numel(), dtype=g.dtype, device=g.device
            )
        history, count = state["fisher_history"], state["fisher_count"]
        history[count % self.history_size] = g
        state["fisher_count"] = count + 1
        window = history[: min(count + 1, self.history_size)]
        natural = woodbury_natural_gradient(g.double(), window.double(), self.damping)
        return natural.to(low_rank_grad.dtype).view_as(low_rank_grad)
