"""Layer-wise updates: the step taken in each parameter's post-accumulate-grad hook."""

import copy

import torch

from effllm.optim import (
    GaLoreAdamW,
    LayerwiseOptimizer,
    build_optimizer,
    enable_layerwise_updates,
    release_state,
)

GALORE = {"rank": 8, "update_proj_gap": 2, "scale": 0.5}


def _train(model, opt, loss_fn, batches, scheduler=None):
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _batches(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(count)]


def test_layerwise_galore_equals_the_standard_step(llama, loss_fn):
    standard_model, layerwise_model = llama(), llama()
    standard = build_optimizer("galore_adamw", standard_model, lr=1e-2, weight_decay=0.1, **GALORE)
    layerwise = build_optimizer(
        "galore_adamw", layerwise_model, lr=1e-2, weight_decay=0.1, layerwise=True, **GALORE
    )
    assert isinstance(layerwise, LayerwiseOptimizer)
    batches = _batches(5)
    _train(standard_model, standard, loss_fn, batches)
    _train(layerwise_model, layerwise, loss_fn, batches)
    for (name, p), q in zip(standard_model.named_parameters(), layerwise_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_gradients_of_all_layers_never_coexist(llama, loss_fn, batch):
    model = llama()
    params = list(model.parameters())
    live = []
    for p in params:  # registered first, so it runs before the optimizer's hook on the same parameter
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    enable_layerwise_updates(model, lambda groups: GaLoreAdamW(groups, lr=1e-3))
    loss_fn(model, batch).backward()
    assert len(live) == len(params)
    assert max(live) == 1  # only the gradient being consumed exists
    assert all(p.grad is None for p in params)


def test_a_scheduler_on_the_wrapper_steps_once_per_training_step(llama, loss_fn):
    def schedule(step):
        return 1.0 / (1 + step)

    standard_model, layerwise_model = llama(), llama()
    standard = build_optimizer("adamw", standard_model, lr=1e-2)
    layerwise = build_optimizer("adamw", layerwise_model, lr=1e-2, layerwise=True)
    batches = _batches(4)
    _train(standard_model, standard, loss_fn, batches, torch.optim.lr_scheduler.LambdaLR(standard, schedule))
    _train(
        layerwise_model, layerwise, loss_fn, batches, torch.optim.lr_scheduler.LambdaLR(layerwise, schedule)
    )
    inner = layerwise._inner[next(layerwise_model.parameters())][0]
    assert inner.param_groups[0]["lr"] == 1e-2 * schedule(3)  # lr of the last step taken, not doubled
    for p, q in zip(standard_model.parameters(), layerwise_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_accumulation_steps_on_the_summed_gradient_of_the_micro_batches(llama, loss_fn):
    standard_model, layerwise_model = llama(), llama()
    standard = build_optimizer("galore_adamw", standard_model, lr=1e-2, **GALORE)
    layerwise = build_optimizer(
        "galore_adamw", layerwise_model, lr=1e-2, layerwise=True, accumulation_steps=2, **GALORE
    )
    micro_batches = _batches(6)
    for first, second in zip(micro_batches[::2], micro_batches[1::2], strict=True):
        standard.zero_grad()
        (loss_fn(standard_model, first) / 2).backward()
        (loss_fn(standard_model, second) / 2).backward()
        standard.step()
        (loss_fn(layerwise_model, first) / 2).backward()
        (loss_fn(layerwise_model, second) / 2).backward()
    assert layerwise.accumulation_steps == 2
    assert all(p.grad is None for p in layerwise_model.parameters())  # consumed at every second backward
    for p, q in zip(standard_model.parameters(), layerwise_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_release_state_and_state_dict_round_trip(llama, loss_fn, batch):
    model = llama()
    opt = build_optimizer("galore_adamw", model, lr=1e-2, layerwise=True, **GALORE)
    loss_fn(model, batch).backward()
    first = next(model.parameters())
    saved = copy.deepcopy(opt.state_dict())

    release_state(opt, [first])
    assert not opt._inner[first][0].state

    restored_model = llama()
    restored_model.load_state_dict(model.state_dict())
    restored = build_optimizer("galore_adamw", restored_model, lr=1e-2, layerwise=True, **GALORE)
    restored.load_state_dict(saved)
    loss_fn(restored_model, batch).backward()  # the second step, resumed from the checkpoint
    reference_model = llama()
    reference = build_optimizer("galore_adamw", reference_model, lr=1e-2, **GALORE)
    for _ in range(2):
        reference.zero_grad()
        loss_fn(reference_model, batch).backward()
        reference.step()
    for p, q in zip(reference_model.parameters(), restored_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
