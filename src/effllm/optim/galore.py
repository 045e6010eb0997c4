"""GaLore: AdamW whose moments live in a low-rank projection of each weight matrix's gradient.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (ICML 2024).
A drop-in for galore-torch's `GaLoreAdamW`: parameter groups that carry `rank` (and optionally
`update_proj_gap`, `scale`, `proj_type`, `svd`) are projected, every other group is plain AdamW.
"""

from collections.abc import Iterable
from typing import Any

import torch

from effllm.core.errors import ConfigError
from effllm.optim.adam import adam_direction
from effllm.optim.projector import PROJ_TYPES, SVD_METHODS, GaLoreProjector

LOW_RANK_DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "svd": "exact"}


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection for the groups that set `rank`.

    For a matrix W with gradient G_t (the paper's "Adam with GaLore" algorithm):
        every `update_proj_gap` steps (t = 0, T, 2T, ...):  P_t from the SVD of G_t, else P_t = P_{t-1}
        R_t = project(G_t)                                   # [m, r], [r, n] or [r, r]
        N_t = M̂_t / (√V̂_t + ε)                              # Adam on R_t, moments of R_t's shape
        W  ← (1 - η λ) W - η · scale · project_back(N_t)
    The moments are neither reset nor rotated when P changes, and the step count keeps running, as in
    the paper and galore-torch. Two deliberate differences from galore-torch, both so that an identity
    projector reproduces `torch.optim.AdamW` exactly: ε is added after the bias correction of V
    (as the paper writes it; galore-torch adds it before), and weight decay is decoupled and applied
    before the update (torch's AdamW order; galore-torch applies it after). Defaults follow
    galore-torch (ε=1e-6); in a group without `rank` the step is exactly `torch.optim.AdamW`'s.

    `seed` and the parameter's step count seed the randomized SVD (option `svd="randomized"`), so a
    resumed run draws the same sketches.
    """

    projector_class: type[GaLoreProjector] = GaLoreProjector

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(
                f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}: lr, eps and weight_decay must be >= 0 and each beta in [0, 1)"
            )
        self.seed = seed
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a group with `rank` gets the low-rank defaults and is checked."""
        if "rank" in param_group:
            for key, value in LOW_RANK_DEFAULTS.items():
                param_group.setdefault(key, value)
            _check_low_rank_options(param_group)
        super().add_param_group(param_group)
        if "rank" in param_group:
            for p in param_group["params"]:
                if p.dim() != 2:
                    raise ConfigError(
                        f"a GaLore group (with 'rank') holds a parameter of shape {tuple(p.shape)}; "
                        "GaLore projects matrices only: put the others in a group without 'rank'"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", 0)
                if "rank" in group:
                    self._step_matrix(p, group, state)
                else:
                    self._step_dense(p, group, state)
        return loss

    def projector(self, group: dict[str, Any]) -> GaLoreProjector:
        """The projector a low-rank group describes."""
        return self.projector_class(
            rank=group["rank"], scale=group["scale"], proj_type=group["proj_type"], svd=group["svd"]
        )

    def _step_dense(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] += 1
        self._apply(p, self._adam(state, "", p.grad, group), group)

    def _step_matrix(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        projector = self.projector(group)
        self._maybe_refresh(projector, p.grad, group, state)
        low_rank = self._precondition(projector.project(p.grad, state), group, state)
        state["step"] += 1
        direction = self._adam(state, "", low_rank, group)
        self._apply(p, projector.project_back(direction, state), group)

    def _maybe_refresh(
        self, projector: GaLoreProjector, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> bool:
        """Recompute the basis at steps 0, T, 2T, ...; True if it did."""
        if state["step"] % group["update_proj_gap"] != 0:
            return False
        generator = torch.Generator(device=grad.device).manual_seed(self.seed + state["step"])
        state.update(projector.compute_basis(grad, generator))
        return True

    def _precondition(
        self, low_rank_grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> torch.Tensor:
        """Transform the projected gradient before Adam sees it (identity here; Natural GaLore overrides)."""
        return low_rank_grad

    def _adam(
        self, state: dict[str, Any], prefix: str, grad: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        exp_avg, exp_avg_sq = self._load_moments(state, prefix, grad)
        grad = grad.to(exp_avg.dtype)
        direction = adam_direction(exp_avg, exp_avg_sq, grad, group["betas"], group["eps"], state["step"])
        self._store_moments(state, prefix, exp_avg, exp_avg_sq)
        return direction

    def _load_moments(
        self, state: dict[str, Any], prefix: str, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if prefix + "exp_avg" not in state:
            state[prefix + "exp_avg"] = torch.zeros_like(like)
            state[prefix + "exp_avg_sq"] = torch.zeros_like(like)
        return state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"]

    def _store_moments(
        self, state: dict[str, Any], prefix: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
    ) -> None:
        """The moments were updated in place; 8-bit storage overrides this to quantize them."""

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, group: dict[str, Any]) -> None:
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])


def _check_low_rank_options(group: dict[str, Any]) -> None:
    if not isinstance(group["rank"], int) or group["rank"] < 1:
        raise ConfigError(f"GaLore 'rank' must be a positive integer, got {group['rank']!r}")
    if not isinstance(group["update_proj_gap"], int) or group["update_proj_gap"] < 1:
        raise ConfigError(
            f"GaLore 'update_proj_gap' must be a positive integer, got {group['update_proj_gap']!r}"
        )
    if group["proj_type"] not in PROJ_TYPES:
        raise ConfigError(f"GaLore 'proj_type' {group['proj_type']!r} is not one of {', '.join(PROJ_TYPES)}")
    if group["svd"] not in SVD_METHODS:
        raise ConfigError(f"GaLore 'svd' {group['svd']!r} is not one of {', '.join(SVD_METHODS)}")
