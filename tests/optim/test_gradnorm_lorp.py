"""GradNormLoRP: AdamW on W = M ⊙ V/‖V‖ with V's gradient projected to low rank."""

import torch

from effllm.optim import GaLoreProjector, GradNormLoRPAdamW


class IdentityProjector(GaLoreProjector):
    def compute_basis(self, grad, generator=None):
        left, right = self.sides(grad.shape)
        basis = {}
        if left:
            basis["proj_left"] = torch.eye(grad.shape[0], dtype=grad.dtype)
        if right:
            basis["proj_right"] = torch.eye(grad.shape[1], dtype=grad.dtype)
        return basis


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randn(32, 6, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return w0, lambda w: ((x @ w.T - y) ** 2).mean()


def test_identity_projector_equals_adamw_on_the_weight_normalised_parameters():
    class IdentityGradNorm(GradNormLoRPAdamW):
        projector_class = IdentityProjector

    w0, loss_of = _problem()
    w = torch.nn.Parameter(w0.clone())
    ours = IdentityGradNorm([{"params": [w], "rank": 6, "scale": 1.0}], lr=0.02, eps=1e-6, weight_decay=0.1)

    magnitude = torch.nn.Parameter(w0.norm(dim=1))
    direction = torch.nn.Parameter(w0.clone())
    reference = torch.optim.AdamW(
        [{"params": [magnitude], "weight_decay": 0.1}, {"params": [direction], "weight_decay": 0.0}],
        lr=0.02,
        eps=1e-6,
    )

    def reparameterised():
        return magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)

    for _ in range(8):
        ours.zero_grad()
        loss_of(w).backward()
        ours.step()
        reference.zero_grad()
        loss_of(reparameterised()).backward()
        reference.step()
        torch.testing.assert_close(w.detach(), reparameterised().detach())
    torch.testing.assert_close(ours.state[w]["magnitude"], magnitude.detach())
    torch.testing.assert_close(ours.state[w]["direction_norm"], direction.detach().norm(dim=1))


def test_direction_moves_in_a_rank_r_subspace_and_row_norms_stay_the_magnitudes():
    w0, loss_of = _problem(1)
    w = torch.nn.Parameter(w0.clone())
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 2, "update_proj_gap": 10}], lr=0.05)

    def direction():  # V = ‖V‖ ⊙ W/‖W‖, recovered from W and the state
        state = opt.state[w]
        return state["direction_norm"][:, None] * w.detach() / w.detach().norm(dim=1, keepdim=True)

    loss_of(w).backward()
    opt.step()
    v1 = direction()
    for _ in range(3):
        opt.zero_grad()
        loss_of(w).backward()
        opt.step()
    moved = direction() - v1  # a sum of U·N·Vᵀ over one basis (no refresh since step 0)
    assert torch.linalg.matrix_rank(moved, rtol=1e-9) <= 2
    torch.testing.assert_close(w.detach().norm(dim=1), opt.state[w]["magnitude"].abs())
    assert opt.state[w]["exp_avg"].shape == (2, 2)  # two-sided by default: r×r moments


def test_training_lowers_the_loss():
    w0, loss_of = _problem(2)
    w = torch.nn.Parameter(w0.clone())
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 3, "update_proj_gap": 5}], lr=0.05)
    start = float(loss_of(w.detach()))
    for _ in range(30):
        opt.zero_grad()
        loss_of(w).backward()
        opt.step()
    assert float(loss_of(w.detach())) < 0.9 * start
