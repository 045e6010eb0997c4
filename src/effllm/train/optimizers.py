"""Optimizers by name: every one `effllm.optim` provides, and torch's AdamW and SGD.

`effllm.optim.build_optimizer(name, model, lr, weight_decay, **options)` is asked first, so a method that
ships an optimizer there (GaLore, zeroth-order ...) is available to `effllm train --optimizer NAME` with
no change here. An optimizer whose class sets `requires_backward = False` is stepped with a closure that
returns the loss computed under no_grad (see `Trainer`).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch
from torch import nn

from effllm.core.errors import ConfigError

TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def available_optimizers() -> list[str]:
    names = set(TORCH_OPTIMIZERS)
    library = _effllm_optim()
    if library is not None:
        names.update(library.list_optimizers())
    return sorted(names)


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    options: dict[str, Any] | None = None, grad_accum: int = 1) -> torch.optim.Optimizer:
    """The optimizer `name` over `model`'s trainable parameters; ConfigError for unknown names or options.

    Layer-wise updates (`layerwise=true`) step inside backward, so they are told the accumulation.
    """
    options = dict(options or {})
    if options.get("layerwise"):
        options.setdefault("accumulation_steps", grad_accum)
    library = _effllm_optim()
    if library is not None and name in library.list_optimizers():
        try:
            return library.build_optimizer(name, model, lr=lr, weight_decay=weight_decay, **options)
        except TypeError as e:
            raise ConfigError(f"--optimizer {name}: {e}; check --optimizer-options") from None
    if name not in TORCH_OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(available_optimizers())}")
    cls = TORCH_OPTIMIZERS[name]
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("self", "params", "lr", "weight_decay")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"--optimizer {name} has no option {unknown[0]!r}; its options are {', '.join(allowed)}")
    try:
        return cls(param_groups(model, weight_decay), lr=lr, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--optimizer {name}: {e}; check --optimizer-options") from None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never norms or biases (1-D), as nanoGPT and most LLM recipes do."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def steps_in_backward(optimizer: torch.optim.Optimizer) -> bool:
    """True for layer-wise updates, which step each parameter from a gradient hook during backward."""
    library = _effllm_optim()
    layerwise = getattr(library, "LayerwiseOptimizer", None) if library is not None else None
    return layerwise is not None and isinstance(optimizer, layerwise)


def requires_backward(optimizer: torch.optim.Optimizer) -> bool:
    """False for optimizers (zeroth-order) that estimate the step from losses alone."""
    return bool(getattr(optimizer, "requires_backward", True))


def _effllm_optim() -> ModuleType | None:
    try:
        import effllm.optim as library
    except ImportError:
        return None
    return library if hasattr(library, "build_optimizer") and hasattr(library, "list_optimizers") else None
