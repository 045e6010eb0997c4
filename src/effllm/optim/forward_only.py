"""What the backprop-free optimizers share: seeded Gaussian directions and the no-backward contract."""

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from effllm.core.errors import ConfigError

_MASK63 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """The seed of the directions at `step`, a fixed function of (seed, step): a resumed run redraws them."""
    return (seed * 6364136223846793005 + (step + 1) * 1442695040888963407) & _MASK63


def gaussian_directions(params: Iterable[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """z ~ N(0, I) shaped like each parameter in turn, one at a time, identical every time for a seed.

    As in MeZO, z is never stored: one generator per device is seeded once and the parameters are walked
    in the same order, so the same seed regenerates the same z.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        yield torch.randn(p.shape, generator=generators[p.device], dtype=p.dtype, device=p.device)


class ForwardOnlyOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that need no backward pass.

    The trainer reads two class attributes: `requires_backward = False` (call `step(closure)` instead of
    `loss.backward(); step()`) and `closure_takes_params` (whether the closure receives the parameters,
    see `ForwardGradSGD`). Parameters whose `requires_grad` is False are left alone, so freezing (e.g.
    layer sampling) works as with the gradient optimizers. The step counter that seeds the directions is
    part of `state_dict()`.
    """

    requires_backward = False
    closure_takes_params = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], seed: int):
        if defaults["lr"] < 0 or defaults["weight_decay"] < 0:
            raise ConfigError(
                f"lr and weight_decay must be >= 0, got {defaults['lr']} and {defaults['weight_decay']}"
            )
        super().__init__(params, defaults)
        self.seed = seed
        self.step_count = 0

    def trainable(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """(group, parameter) for every parameter that trains, in a fixed order."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def next_seed(self) -> int:
        """The seed of this step's directions; advances the step counter."""
        seed = step_seed(self.seed, self.step_count)
        self.step_count += 1
        return seed

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus the step counter."""
        state = super().state_dict()
        state["step_count"] = self.step_count
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        state_dict = dict(state_dict)
        self.step_count = state_dict.pop("step_count")
        super().load_state_dict(state_dict)

    def _require(self, closure: Any) -> None:
        if closure is None:
            raise ConfigError(
                f"{type(self).__name__} takes no backward pass: call step(closure) with a closure that "
                "returns the loss (the trainer does this when optimizer.requires_backward is False)"
            )
