"""Optimizers, each a `torch.optim.Optimizer`: the GaLore family and the backprop-free family.

Pick one by name with `build_optimizer(name, model, lr, weight_decay, **options)`; `list_optimizers()`
describes them. The backprop-free ones have `requires_backward = False` and are stepped with a closure.
"""

from effllm.optim.forward_grad import ForwardGradSGD
from effllm.optim.forward_only import ForwardOnlyOptimizer, gaussian_directions, step_seed
from effllm.optim.galore import GaLoreAdamW
from effllm.optim.galore_8bit import GaLoreAdamW8bit
from effllm.optim.gradnorm_lorp import GradNormLoRPAdamW
from effllm.optim.groups import LOW_RANK_TARGETS, split_param_groups
from effllm.optim.layerwise import LayerwiseOptimizer, enable_layerwise_updates, release_state
from effllm.optim.natural_galore import NaturalGaLoreAdamW, woodbury_natural_gradient
from effllm.optim.projector import GaLoreProjector
from effllm.optim.quantize8bit import dequantize_blockwise, dynamic_code, quantize_blockwise
from effllm.optim.registry import (
    build_optimizer,
    list_optimizers,
    optimizer_options,
    requires_backward,
    steps_in_backward,
)
from effllm.optim.zeroth_order import ZOSGD, ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign

__all__ = [
    "LOW_RANK_TARGETS",
    "ZOSGD",
    "ForwardGradSGD",
    "ForwardOnlyOptimizer",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreProjector",
    "GradNormLoRPAdamW",
    "LayerwiseOptimizer",
    "NaturalGaLoreAdamW",
    "ZOAdam",
    "ZOSGDConservative",
    "ZOSGDMomentum",
    "ZOSGDSign",
    "build_optimizer",
    "dequantize_blockwise",
    "dynamic_code",
    "enable_layerwise_updates",
    "gaussian_directions",
    "list_optimizers",
    "optimizer_options",
    "quantize_blockwise",
    "release_state",
    "requires_backward",
    "split_param_groups",
    "step_seed",
    "steps_in_backward",
    "woodbury_natural_gradient",
]
