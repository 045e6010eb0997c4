"""Every registered optimizer lowers the loss of a small Llama on a fixed batch in a few steps."""

import pytest
import torch

from effllm.optim import build_optimizer, list_optimizers

# Momentum multiplies the step about tenfold: its zeroth-order variant needs a smaller rate.
LR = {"sgd": 0.2, "zo_sgd_sign": 3e-3, "zo_sgd_momentum": 2e-4}
OPTIONS = {
    "galore_adamw": {"rank": 8, "update_proj_gap": 5, "scale": 1.0},
    "galore_adamw8bit": {
        "rank": 8,
        "update_proj_gap": 5,
        "scale": 1.0,
        "min_8bit_size": 0,
        "block_size": 256,
    },
    "natural_galore_adamw": {"rank": 8, "update_proj_gap": 5, "scale": 1.0},
    "gradnorm_lorp_adamw": {"rank": 8, "update_proj_gap": 5, "scale": 1.0},
}


@pytest.mark.parametrize("name", list(list_optimizers()))
def test_optimizer_lowers_the_loss_of_a_small_llama(name, llama, loss_fn, batch):
    model = llama()
    default_lr = 1e-2 if not name.startswith(("zo", "forward")) else 1e-3
    opt = build_optimizer(
        name, model, lr=LR.get(name, default_lr), weight_decay=0.01, **OPTIONS.get(name, {})
    )
    with torch.no_grad():
        start = float(loss_fn(model, batch))
    for _ in range(8):
        if getattr(opt, "requires_backward", True):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        elif opt.closure_takes_params:
            opt.step(lambda params: loss_fn(model, batch, params))
        else:
            opt.step(lambda: loss_fn(model, batch))
    with torch.no_grad():
        end = float(loss_fn(model, batch))
    assert end < start - (0.3 if getattr(opt, "requires_backward", True) else 0.01)
