"""Layer-wise updates: each parameter steps inside its post-accumulate-grad hook.

The GaLore paper's per-layer weight updates: if the update of a parameter happens as soon as its
gradient is complete, during the backward pass, and the gradient is then dropped, the full-size
gradients of all layers never coexist; peak gradient memory falls to about one layer's.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from effllm.core.errors import ConfigError

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class LayerwiseOptimizer(torch.optim.Optimizer):
    """An optimizer whose parameters update themselves during `backward()`.

    Holds one inner optimizer per parameter, built by `optimizer_factory([group])` from the parameter's
    group (so GaLore keys such as `rank` carry over), and registers a post-accumulate-grad hook on each
    parameter that takes the inner step and sets `.grad` to None.

    Use it like any optimizer: `loss.backward()` performs the update; `step()` does nothing (it only
    evaluates a closure when given one) and `zero_grad()` finds nothing to clear. Its `param_groups`
    hold the hyperparameters: an LR scheduler attached to this object steps once per training step,
    and each hook copies the group's current values into the inner optimizer before stepping.

    Gradient accumulation: with `accumulation_steps = k`, a hook steps on every k-th gradient it
    receives, and the gradient accumulates in `.grad` in between. The result equals a standard step
    on the summed gradient, but between micro-batches every layer's gradient is held, so the memory
    saving holds only with k = 1 (which is why galore-torch, torchtune and LLaMA-Factory require it).
    It also assumes every parameter gets a gradient in every micro-batch. Not possible in this mode:
    clipping by the global gradient norm (the gradients never all exist at once), AMP gradient
    scaling, and DDP/FSDP (the hook fires on the local gradient, before it is all-reduced): one process,
    as in galore-torch.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_factory: OptimizerFactory,
        accumulation_steps: int = 1,
    ):
        if accumulation_steps < 1:
            raise ConfigError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        super().__init__(params, {})
        self.accumulation_steps = accumulation_steps
        self._inner: dict[torch.Tensor, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}
        self._pending: dict[torch.Tensor, int] = {}
        self._handles = []
        for group in self.param_groups:
            options = _options(group)
            for p in group["params"]:
                inner = optimizer_factory([{**options, "params": [p]}])
                for key, value in _options(inner.param_groups[0]).items():
                    group.setdefault(key, value)
                self._inner[p] = (inner, group)
                self._pending[p] = 0
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def step(self, closure=None):
        """Updates already happened in backward(); only evaluates `closure` if one is given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The per-parameter optimizers that take the steps (their `state` is this optimizer's state)."""
        return [inner for inner, _ in self._inner.values()]

    def release_state(self, params: Iterable[torch.Tensor]) -> None:
        """Drop the optimizer state (moments, projectors) of `params`; they start afresh if trained again."""
        for p in params:
            if p in self._inner:
                self._inner[p][0].state.pop(p, None)
                self._pending[p] = 0

    def remove_hooks(self) -> None:
        """Unregister every hook: the parameters stop updating during backward."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, Any]:
        """The groups plus each inner optimizer's state, in parameter order."""
        state = super().state_dict()
        state["inner"] = [
            self._inner[p][0].state_dict() for group in self.param_groups for p in group["params"]
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        state_dict = dict(state_dict)
        inner_states = state_dict.pop("inner")
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for p, inner_state in zip(params, inner_states, strict=True):
            self._inner[p][0].load_state_dict(inner_state)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        self._pending[p] += 1
        if self._pending[p] < self.accumulation_steps:
            return
        self._pending[p] = 0
        inner, group = self._inner[p]
        inner.param_groups[0].update(_options(group))
        inner.step()
        p.grad = None


def enable_layerwise_updates(
    model_or_params: torch.nn.Module | Iterable[Any],
    optimizer_factory: OptimizerFactory,
    accumulation_steps: int = 1,
) -> LayerwiseOptimizer:
    """Make every trainable parameter of a model (or the given params/groups) update during backward.

    Example: `opt = enable_layerwise_updates(model, lambda groups: GaLoreAdamW(groups, lr=1e-3))`;
    then each `loss.backward()` is a training step. See `LayerwiseOptimizer` for accumulation.
    """
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params = [p for p in model_or_params.parameters() if p.requires_grad]
    return LayerwiseOptimizer(model_or_params, optimizer_factory, accumulation_steps)


def release_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Free the optimizer state of `params` (e.g. of layers that were just frozen), for any optimizer here."""
    if isinstance(optimizer, LayerwiseOptimizer):
        optimizer.release_state(params)
        return
    for p in params:
        optimizer.state.pop(p, None)


def _options(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}
