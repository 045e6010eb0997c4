"""ForwardGradSGD: one jvp gives ∇L·v, the step is −lr·(∇L·v)·v."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.optim import ForwardGradSGD, gaussian_directions, step_seed


def test_step_is_the_autograd_directional_derivative_along_the_seeded_direction(llama, loss_fn, batch):
    model = llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen: neither in params nor moved
    opt = ForwardGradSGD(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    assert opt.requires_backward is False and opt.closure_takes_params is True
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in model.parameters()]
    loss_before = loss_fn(model, batch)
    grads = torch.autograd.grad(loss_before, trainable)
    seen = []

    def closure(params):
        seen.append(set(params))
        return loss_fn(model, batch, params)

    loss = opt.step(closure)

    directions = list(gaussian_directions(trainable, step_seed(opt.seed, 0)))
    derivative = sum((g * v).sum() for g, v in zip(grads, directions, strict=True))
    assert opt.directional_derivative == pytest.approx(float(derivative), rel=1e-4)
    assert float(loss) == pytest.approx(float(loss_before.detach()), rel=1e-6)
    assert "model.embed_tokens.weight" not in seen[0]
    moved = iter(directions)
    for p, p0 in zip(model.parameters(), start, strict=True):
        if not p.requires_grad:
            assert torch.equal(p, p0)
            continue
        expected = p0 * (1 - 1e-3 * 0.1) - 1e-3 * opt.directional_derivative * next(moved)
        torch.testing.assert_close(p.detach(), expected)
    assert all(p.grad is None for p in model.parameters())


def test_needs_named_parameters():
    with pytest.raises(ConfigError, match="named_parameters"):
        ForwardGradSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
