"""Optimizers by name: `build_optimizer("galore_adamw", model, lr=1e-3, weight_decay=0.0, rank=128)`."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from effllm.core.errors import ConfigError
from effllm.optim.forward_grad import ForwardGradSGD
from effllm.optim.galore import GaLoreAdamW
from effllm.optim.galore_8bit import GaLoreAdamW8bit
from effllm.optim.gradnorm_lorp import GradNormLoRPAdamW
from effllm.optim.groups import LOW_RANK_TARGETS, split_param_groups
from effllm.optim.layerwise import LayerwiseOptimizer
from effllm.optim.natural_galore import NaturalGaLoreAdamW
from effllm.optim.zeroth_order import ZOSGD, ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign

# Keys that travel in the low-rank parameter group rather than to the constructor.
_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "svd")
_BUILD_KEYS = ("targets", "layerwise", "accumulation_steps")

_BACKPROP = {"layerwise": False, "accumulation_steps": 1}
_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}
# transformers' GaLore defaults (rank 128, gap 200, scale 0.25, std) and galore-torch's eps.
_GALORE = {
    "rank": 128,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd": "exact",
    "targets": LOW_RANK_TARGETS,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "seed": 0,
    **_BACKPROP,
}
_ZO = {"zo_eps": 1e-3, "perturbation": "two_side", "seed": 0}


@dataclass(frozen=True)
class _Spec:
    cls: type[torch.optim.Optimizer]
    description: str
    options: dict[str, Any]

    @property
    def low_rank(self) -> bool:
        return "rank" in self.options


_REGISTRY: dict[str, _Spec] = {
    "adamw": _Spec(
        torch.optim.AdamW, "AdamW (torch.optim.AdamW), decoupled weight decay", {**_ADAMW, **_BACKPROP}
    ),
    "sgd": _Spec(
        torch.optim.SGD,
        "SGD with optional (Nesterov) momentum (torch.optim.SGD)",
        {"momentum": 0.0, "nesterov": False, **_BACKPROP},
    ),
    "galore_adamw": _Spec(
        GaLoreAdamW,
        "GaLore: AdamW on low-rank projections of attention/MLP gradients (SVD every update_proj_gap steps)",
        _GALORE,
    ),
    "galore_adamw8bit": _Spec(
        GaLoreAdamW8bit,
        "GaLore with the Adam moments in blockwise 8-bit",
        {**_GALORE, "block_size": 2048, "min_8bit_size": 4096},
    ),
    "natural_galore_adamw": _Spec(
        NaturalGaLoreAdamW,
        "Natural GaLore: low-rank gradient preconditioned by the inverse empirical Fisher (Woodbury)",
        {**_GALORE, "history_size": 20, "damping": 1e-3},
    ),
    "gradnorm_lorp_adamw": _Spec(
        GradNormLoRPAdamW,
        "GradNormLoRP: weight-normalised matrices trained with two-sided low-rank projected gradients",
        {**_GALORE, "proj_type": "full"},
    ),
    "zo_sgd": _Spec(
        ZOSGD, "MeZO zeroth-order SGD: two forward passes a step, no backward, inference memory", _ZO
    ),
    "zo_sgd_sign": _Spec(ZOSGDSign, "ZO-SGD-Sign: MeZO step of fixed size lr·‖z‖ along sign(ĝ)·z", _ZO),
    "zo_sgd_momentum": _Spec(
        ZOSGDMomentum,
        "ZO-SGD with momentum on the estimate (one parameter-sized buffer)",
        {**_ZO, "momentum": 0.9},
    ),
    "zo_sgd_conservative": _Spec(
        ZOSGDConservative,
        "ZO-SGD keeping the best of no step, the step and its opposite (loss never rises)",
        _ZO,
    ),
    "zo_adam": _Spec(
        ZOAdam, "ZO-Adam: AdamW on the zeroth-order estimate (two parameter-sized buffers)", {**_ZO, **_ADAMW}
    ),
    "forward_grad_sgd": _Spec(
        ForwardGradSGD,
        "Forward-gradient SGD: directional derivative by torch.func.jvp, no backward",
        {"seed": 0},
    ),
}


def list_optimizers() -> dict[str, str]:
    """Every registered optimizer name with a one-line description."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def optimizer_options(name: str) -> dict[str, Any]:
    """The options `name` accepts, with their defaults."""
    return dict(_spec(name).options)


def build_optimizer(
    name: str,
    model_or_params: torch.nn.Module | Iterable[Any],
    lr: float,
    weight_decay: float = 0.0,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build a registered optimizer over a model's trainable parameters (or given params or groups).

    For a model (or (name, parameter) pairs) the parameters are grouped by `split_param_groups`: for the
    GaLore family, 2-D weights whose name contains one of `targets` (default `self_attn`, `mlp`) form the
    low-rank group with `rank`, `update_proj_gap`, `scale`, `proj_type`, `svd`; other matrices get
    `weight_decay`; 1-D parameters none. Parameter groups (dicts) are used as given, galore-torch
    style: a group with `rank` is low-rank. `layerwise=True` (backprop optimizers) returns a
    `LayerwiseOptimizer` that steps each parameter during backward, with `accumulation_steps`.
    Unknown names or options raise ConfigError listing the valid ones.
    """
    spec = _spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(
            f"optimizer {name!r} takes no option {', '.join(unknown)}; "
            f"valid options: {', '.join(spec.options)}"
        )
    settings = {**spec.options, **options}
    layerwise = settings.pop("layerwise", False)
    accumulation_steps = settings.pop("accumulation_steps", 1)
    targets = settings.pop("targets", LOW_RANK_TARGETS)
    low_rank = {key: settings.pop(key) for key in _GROUP_KEYS if key in settings} or None
    groups = _param_groups(name, model_or_params, weight_decay, low_rank, targets)

    def make(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        try:
            return spec.cls(param_groups, lr=lr, weight_decay=weight_decay, **settings)
        except (TypeError, ValueError) as err:  # bad hyperparameters (a string where a number belongs ...)
            raise ConfigError(f"optimizer {name!r}: {err}; check its options") from err

    if layerwise:
        return LayerwiseOptimizer(groups, make, accumulation_steps)
    if accumulation_steps != 1:
        raise ConfigError(
            "accumulation_steps is an option of layer-wise updates: set layerwise=True or leave it at 1"
        )
    return make(groups)


def requires_backward_by_name(name: str) -> bool:
    """False for the optimizers that step from forward passes alone (they keep no gradients)."""
    return bool(getattr(_spec(name).cls, "requires_backward", True))


def requires_backward(optimizer: torch.optim.Optimizer) -> bool:
    """False for a built optimizer (zeroth-order, forward-gradient) stepped with a closure instead."""
    return bool(getattr(optimizer, "requires_backward", True))


def steps_in_backward(optimizer: torch.optim.Optimizer) -> bool:
    """True for layer-wise updates, which step each parameter from a gradient hook during backward."""
    return isinstance(optimizer, LayerwiseOptimizer)


def _spec(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown optimizer {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _param_groups(
    name: str,
    model_or_params: torch.nn.Module | Iterable[Any],
    weight_decay: float,
    low_rank: dict[str, Any] | None,
    targets: Iterable[str],
) -> list[dict[str, Any]]:
    if isinstance(model_or_params, torch.nn.Module):
        items = list(model_or_params.named_parameters())
    else:
        items = list(model_or_params)
    if not items:
        raise ConfigError(f"optimizer {name!r} got no parameters to train")
    if isinstance(items[0], dict):
        return [dict(group) for group in items]
    if isinstance(items[0], tuple):
        groups = split_param_groups(items, weight_decay, low_rank, tuple(targets))
    elif low_rank is not None:
        raise ConfigError(
            f"optimizer {name!r} picks its low-rank matrices by name: pass the model, named_parameters(), "
            "or parameter groups with 'rank'"
        )
    else:
        groups = [{"params": [p for p in items if p.requires_grad]}]
    if not groups or not any(group["params"] for group in groups):
        raise ConfigError(f"optimizer {name!r} got no trainable parameters (all have requires_grad=False)")
    return groups
