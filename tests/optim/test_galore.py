"""GaLoreAdamW: what the projection changes and what it must leave exactly as AdamW."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.optim import GaLoreAdamW, GaLoreProjector


class IdentityProjector(GaLoreProjector):
    """A projector whose bases are identity matrices: R = G, and the update comes back unchanged."""

    def compute_basis(self, grad, generator=None):
        left, right = self.sides(grad.shape)
        m, n = grad.shape
        basis = {}
        if left:
            basis["proj_left"] = torch.eye(m, dtype=grad.dtype)
        if right:
            basis["proj_right"] = torch.eye(n, dtype=grad.dtype)
        return basis


class FixedProjector(GaLoreProjector):
    """A right projector onto a given orthogonal matrix, whatever the gradient."""

    basis: torch.Tensor = None

    def compute_basis(self, grad, generator=None):
        return {"proj_right": type(self).basis}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(6, 4, generator=g)),
        torch.nn.Parameter(torch.randn(3, 5, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_identity_projector_with_scale_one_equals_adamw_step_by_step(proj_type):
    class IdentityGaLore(GaLoreAdamW):
        projector_class = IdentityProjector

    ours, ref = _params(), _params()
    hyper = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    galore = IdentityGaLore(
        [
            {"params": ours[:2], "rank": 2, "update_proj_gap": 2, "scale": 1.0, "proj_type": proj_type},
            {"params": ours[2:]},
        ],
        **hyper,
    )
    adamw = torch.optim.AdamW(ref, **hyper)
    for step in range(6):
        for p, q, g in zip(ours, ref, _grads(step, ours), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        galore.step()
        adamw.step()
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fixed_orthogonal_projector_equals_adamw_in_rotated_coordinates():
    # GaLore with R = G Qᵀ, Q orthogonal, is AdamW on W' = W Qᵀ (∇_{W'} = G Qᵀ, and W = W' Q).
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(7)))
    FixedProjector.basis = q

    class FixedGaLore(GaLoreAdamW):
        projector_class = FixedProjector

    w = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    w_rot = torch.nn.Parameter(w.detach() @ q.T)
    hyper = {"lr": 0.05, "eps": 1e-6, "weight_decay": 0.1}
    galore = FixedGaLore([{"params": [w], "rank": 4, "proj_type": "right", "scale": 1.0}], **hyper)
    adamw = torch.optim.AdamW([w_rot], **hyper)
    for step in range(5):
        grad = _grads(step, [w])[0]
        w.grad, w_rot.grad = grad, grad @ q.T
        galore.step()
        adamw.step()
        torch.testing.assert_close(w.detach(), w_rot.detach() @ q, rtol=1e-5, atol=1e-6)


def test_projector_refreshes_only_every_gap_steps_to_the_top_singular_subspace():
    w = torch.nn.Parameter(torch.zeros(8, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], lr=1e-3)
    bases = []
    for step in range(8):
        w.grad = _grads(step, [w])[0]
        opt.step()
        basis = opt.state[w]["proj_right"]  # std on a tall matrix projects the right side
        bases.append(basis.clone())
        if step % 3 == 0:
            vh = torch.linalg.svd(w.grad, full_matrices=False).Vh[:2]
            torch.testing.assert_close(basis.T @ basis, vh.T @ vh, rtol=1e-5, atol=1e-5)
    changed = [not torch.equal(bases[i], bases[i - 1]) for i in range(1, 8)]
    assert changed == [False, False, True, False, False, True, False]  # steps 3 and 6


@pytest.mark.parametrize(
    ("proj_type", "shape"), [("left", (9, 7)), ("right", (9, 7)), ("std", (5, 8)), ("full", (9, 7))]
)
def test_residual_at_refresh_equals_next_singular_value(proj_type, shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    projector = GaLoreProjector(rank=3, proj_type=proj_type)
    basis = projector.compute_basis(grad)
    residual = grad - projector.project_back(projector.project(grad, basis), basis)
    sigma = torch.linalg.svdvals(grad)
    torch.testing.assert_close(torch.linalg.matrix_norm(residual, ord=2), sigma[3])


def test_randomized_svd_finds_the_subspace_of_a_decaying_spectrum():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(200, 60, generator=g))
    v, _ = torch.linalg.qr(torch.randn(100, 60, generator=g))
    grad = u @ torch.diag(0.7 ** torch.arange(60.0)) @ v.T
    projector = GaLoreProjector(rank=4, proj_type="left", svd="randomized")
    basis = projector.compute_basis(grad, torch.Generator().manual_seed(0))
    residual = grad - projector.project_back(projector.project(grad, basis), basis)
    assert torch.linalg.matrix_norm(residual, ord=2) <= 0.7**4 * 1.01


def test_moments_have_the_low_rank_shape():
    w = torch.nn.Parameter(torch.zeros(10, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "left"}])
    w.grad = torch.randn(10, 6)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (2, 6)
    assert opt.state[w]["exp_avg_sq"].shape == (2, 6)


def test_low_rank_group_rejects_parameters_that_are_not_matrices():
    with pytest.raises(ConfigError, match="projects matrices only"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2}])
    with pytest.raises(ConfigError, match="proj_type"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2, "proj_type": "diagonal"}])
