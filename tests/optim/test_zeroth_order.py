"""Zeroth-order optimizers: the MeZO estimate, its memory contract, and the ZO-Bench variants."""

import copy

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.optim import (
    ZOSGD,
    ZOAdam,
    ZOSGDConservative,
    ZOSGDMomentum,
    ZOSGDSign,
    gaussian_directions,
    step_seed,
)

ZO_CLASSES = [ZOSGD, ZOSGDSign, ZOSGDMomentum, ZOSGDConservative, ZOAdam]


class Quadratic:
    """f(θ) = ½ θᵀAθ + bᵀθ on one float64 parameter, so the symmetric difference is exactly zᵀ∇f."""

    def __init__(self, dim=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        root = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.a = root @ root.T / dim + torch.eye(dim, dtype=torch.float64)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.theta = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def loss(self):
        return 0.5 * self.theta @ self.a @ self.theta + self.b @ self.theta

    def grad(self):
        return self.a @ self.theta.detach() + self.b


def _z(opt, step, params):
    return list(gaussian_directions(params, step_seed(opt.seed, step)))


def test_two_point_estimate_on_a_quadratic_is_exactly_the_directional_derivative():
    f = Quadratic()
    opt = ZOSGD([f.theta], lr=0.1, zo_eps=1e-3)
    grad, start = f.grad(), f.theta.detach().clone()
    opt.step(f.loss)
    (z,) = _z(opt, 0, [f.theta])
    torch.testing.assert_close(torch.tensor(opt.projected_grad, dtype=torch.float64), z @ grad)
    torch.testing.assert_close(f.theta.detach(), start - 0.1 * opt.projected_grad * z)


def test_mezo_estimate_is_unbiased_with_second_moment_d_plus_2_times_gradient_norm_squared():
    f = Quadratic(dim=6)
    opt = ZOSGD([f.theta], lr=1.0, zo_eps=1e-3)
    start, grad = f.theta.detach().clone(), f.grad()
    samples = []
    for _ in range(4000):
        with torch.no_grad():
            f.theta.copy_(start)
        opt.step(f.loss)
        samples.append(start - f.theta.detach())  # = ĝ·z with lr = 1
    estimates = torch.stack(samples)  # [N, d]
    n, d = estimates.shape

    standard_error = estimates.std(dim=0) / n**0.5
    assert torch.all((estimates.mean(dim=0) - grad).abs() <= 5 * standard_error)
    squared_norms = estimates.square().sum(dim=1)
    expected = (d + 2) * grad.square().sum()  # E[(zᵀg)²‖z‖²] for z ~ N(0, I)
    assert (squared_norms.mean() - expected).abs() <= 5 * squared_norms.std() / n**0.5


def test_one_side_estimate_is_the_forward_difference():
    f = Quadratic()
    opt = ZOSGD([f.theta], lr=0.1, zo_eps=1e-2, perturbation="one_side")
    theta, grad = f.theta.detach().clone(), f.grad()
    opt.step(f.loss)
    (z,) = _z(opt, 0, [f.theta])
    expected = z @ grad + 0.5 * 1e-2 * z @ f.a @ z  # (f(θ+εz) − f(θ))/ε, exact on a quadratic
    assert opt.projected_grad == pytest.approx(float(expected), rel=1e-9)
    torch.testing.assert_close(f.theta.detach(), theta - 0.1 * opt.projected_grad * z)


@pytest.mark.parametrize("cls", ZO_CLASSES)
def test_zo_steps_allocate_no_gradients_and_call_the_closure_without_autograd(cls, llama, loss_fn, batch):
    model = llama()
    opt = cls(model.parameters(), lr=1e-4, weight_decay=0.01)
    assert opt.requires_backward is False and opt.closure_takes_params is False
    grad_modes = []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        return loss_fn(model, batch)

    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert grad_modes and not any(grad_modes)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))


def test_seeded_directions_regenerate_identically_and_differ_between_steps():
    params = [torch.zeros(3, 4), torch.zeros(7)]
    first, again = list(gaussian_directions(params, 11)), list(gaussian_directions(params, 11))
    other = list(gaussian_directions(params, step_seed(0, 1)))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_sign_step_has_norm_lr_times_norm_of_z():
    f = Quadratic()
    opt = ZOSGDSign([f.theta], lr=0.01)
    start = f.theta.detach().clone()
    opt.step(f.loss)
    (z,) = _z(opt, 0, [f.theta])
    step = f.theta.detach() - start
    torch.testing.assert_close(step, -0.01 * torch.sign(torch.tensor(opt.projected_grad)) * z)
    torch.testing.assert_close(step.norm(), 0.01 * z.norm())


def test_momentum_buffer_accumulates_the_estimates():
    f = Quadratic()
    opt = ZOSGDMomentum([f.theta], lr=0.01, momentum=0.9)
    estimates = []
    for step in range(2):
        opt.step(f.loss)
        estimates.append(opt.projected_grad * _z(opt, step, [f.theta])[0])
    torch.testing.assert_close(opt.state[f.theta]["momentum_buffer"], 0.9 * estimates[0] + estimates[1])


def test_zo_adam_is_adamw_on_the_estimate():
    f = Quadratic()
    reference = torch.nn.Parameter(f.theta.detach().clone())
    opt = ZOAdam([f.theta], lr=0.01, weight_decay=0.1)
    adamw = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1)
    for step in range(3):
        opt.step(f.loss)
        reference.grad = opt.projected_grad * _z(opt, step, [f.theta])[0]
        adamw.step()
        torch.testing.assert_close(f.theta, reference)


def test_conservative_step_never_increases_the_batch_loss(llama, loss_fn, batch):
    model = llama(dtype=torch.float64)
    opt = ZOSGDConservative(model.parameters(), lr=3e-3, weight_decay=0.1)

    def closure():
        return loss_fn(model, batch)

    moved = 0
    for _ in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        loss_before = float(opt.step(closure))
        with torch.no_grad():
            loss_after = float(closure())
        assert loss_after <= loss_before + 1e-12
        moved += any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert moved > 0


def test_state_dict_resumes_the_same_directions():
    f, g = Quadratic(), Quadratic()
    opt = ZOSGDMomentum([f.theta], lr=0.01)
    opt.step(f.loss)
    with torch.no_grad():
        g.theta.copy_(f.theta)  # the checkpointed weights
    resumed = ZOSGDMomentum([g.theta], lr=0.01)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through torch.save
    opt.step(f.loss)
    resumed.step(g.loss)
    torch.testing.assert_close(f.theta, g.theta)


def test_frozen_parameters_are_not_perturbed_and_step_needs_a_closure():
    f = Quadratic()
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = ZOSGD([f.theta, frozen], lr=0.1)
    opt.step(f.loss)
    assert torch.equal(frozen, torch.ones(3))
    with pytest.raises(ConfigError, match="closure"):
        opt.step()
