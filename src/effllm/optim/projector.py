"""GaLore's gradient projector: the top-r singular subspace of a gradient matrix, refreshed by SVD.

For a gradient G of shape [m, n] the projector keeps P = U[:, :r] (left, [m, r]) and/or
Q = Vᵀ[:r] (right, [r, n]) from G = U S Vᵀ and maps G to its compact form
    left:  R = Pᵀ G       [r, n]        right: R = G Qᵀ      [m, r]
    both:  R = Pᵀ G Qᵀ    [r, r]
and a compact update N back to α·P N, α·N Q or α·P N Q (GaLore, Zhao et al. 2024:
R_t = P_tᵀ G_t, G̃_t = α P_t N_t; α is `scale`). The bases live in the optimizer state under
"proj_left"/"proj_right", so a checkpoint holds only tensors.
"""

from dataclasses import dataclass

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")

# Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): extra columns and power iterations.
_OVERSAMPLE = 8
_POWER_ITERS = 2


@dataclass(frozen=True)
class GaLoreProjector:
    """How one parameter group projects its gradients.

    `proj_type`: "std" projects the smaller side (right when m >= n, as galore-torch), "reverse_std" the
    larger, "left"/"right" always that side, "full" both sides. `svd`: "exact" (torch.linalg.svd) or
    "randomized" (seeded range finder; cheaper for large matrices, approximate).
    """

    rank: int
    scale: float = 1.0
    proj_type: str = "std"
    svd: str = "exact"

    def sides(self, shape: torch.Size) -> tuple[bool, bool]:
        """(left, right): which sides of a [m, n] gradient this projector compresses."""
        m, n = shape
        if self.proj_type == "full":
            return True, True
        if self.proj_type == "left":
            return True, False
        if self.proj_type == "right":
            return False, True
        right = m >= n if self.proj_type == "std" else m < n
        return not right, right

    def compute_basis(
        self, grad: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The orthonormal bases of the top-`rank` singular subspaces of `grad`, in `grad`'s dtype."""
        left, right = self.sides(grad.shape)
        u, vh = self._svd(grad.float(), generator)
        basis = {}
        if left:
            basis["proj_left"] = u[:, : self.rank].to(grad.dtype).contiguous()
        if right:
            basis["proj_right"] = vh[: self.rank].to(grad.dtype).contiguous()
        return basis

    def project(self, grad: torch.Tensor, basis: dict[str, torch.Tensor]) -> torch.Tensor:
        """G -> Pᵀ G, G Qᵀ or Pᵀ G Qᵀ."""
        if "proj_left" in basis:
            grad = basis["proj_left"].T @ grad
        if "proj_right" in basis:
            grad = grad @ basis["proj_right"].T
        return grad

    def project_back(self, low_rank: torch.Tensor, basis: dict[str, torch.Tensor]) -> torch.Tensor:
        """N -> α P N, α N Q or α P N Q."""
        if "proj_left" in basis:
            low_rank = basis["proj_left"] @ low_rank
        if "proj_right" in basis:
            low_rank = low_rank @ basis["proj_right"]
        return low_rank * self.scale if self.scale != 1.0 else low_rank

    def _svd(
        self, matrix: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.svd == "exact" or self.rank + _OVERSAMPLE >= min(matrix.shape):
            u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
            return u, vh
        return _randomized_svd(matrix, self.rank + _OVERSAMPLE, generator)


def _randomized_svd(
    matrix: torch.Tensor, columns: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """U, Vᵀ of a rank-`columns` approximation: range finder with power iterations, then a small SVD."""
    omega = torch.randn(matrix.shape[1], columns, generator=generator, device=matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(_POWER_ITERS):
        q, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ q)
    u_small, _, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ u_small, vh
