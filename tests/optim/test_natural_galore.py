"""Natural GaLore: the Woodbury transform and where it sits in the step."""

import pytest
import torch

from effllm.optim import GaLoreProjector, NaturalGaLoreAdamW, woodbury_natural_gradient


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_woodbury_transform_equals_a_direct_solve(damping):
    g = torch.Generator().manual_seed(0)
    history = torch.randn(5, 30, generator=g, dtype=torch.float64)
    grad = torch.randn(30, generator=g, dtype=torch.float64)
    fisher = damping * torch.eye(30, dtype=torch.float64) + history.T @ history
    expected = torch.linalg.solve(fisher, grad)
    torch.testing.assert_close(woodbury_natural_gradient(grad, history, damping), expected, rtol=1e-5, atol=0)


def test_history_of_the_gradient_alone_scales_it_by_one_over_damping_plus_norm_squared():
    grad = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    damping = 1e-3
    expected = grad / (damping + grad.dot(grad))
    torch.testing.assert_close(woodbury_natural_gradient(grad, grad[None], damping), expected)


class IdentityProjector(GaLoreProjector):
    def compute_basis(self, grad, generator=None):
        return {"proj_left": torch.eye(grad.shape[0], dtype=grad.dtype)}


class IdentityNaturalGaLore(NaturalGaLoreAdamW):
    projector_class = IdentityProjector


def test_adam_sees_the_natural_gradient_over_a_fifo_that_empties_at_refresh():
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    beta1, damping = 0.9, 1e-2
    opt = IdentityNaturalGaLore(
        [{"params": [w], "rank": 4, "proj_type": "left", "update_proj_gap": 4}],
        lr=1e-3,
        betas=(beta1, 0.999),
        history_size=2,
        damping=damping,
    )
    g = torch.Generator().manual_seed(2)
    grads, expected_m = [], torch.zeros(12, dtype=torch.float64)
    for step in range(6):
        grads.append(torch.randn(4, 3, generator=g, dtype=torch.float64))
        w.grad = grads[-1]
        opt.step()
        since_refresh = grads[4 * (step // 4) : step + 1]
        window = torch.stack([x.reshape(-1) for x in since_refresh[-2:]])  # s = 2, emptied at step 4
        natural = woodbury_natural_gradient(grads[-1].reshape(-1), window, damping)
        expected_m = beta1 * expected_m + (1 - beta1) * natural
        torch.testing.assert_close(opt.state[w]["exp_avg"].reshape(-1), expected_m)
    assert opt.state[w]["fisher_count"] == 2
