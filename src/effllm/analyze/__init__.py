"""The limit every benchmark is measured against: roofline, memory and runtime models.

- `analyze(model, hardware, phase, ...)`: roofline per op and in total for prefill, decode or generate;
  `roofline_fraction(...)`: a measured tokens/s as a fraction of it.
- `get_hardware`, `measure_hardware`, `save_hardware`: the hardware table and this machine.
- `inference_memory`, `training_memory`, `parameter_shapes`: memory estimates.
- `fit_runtime_model`, `RuntimeModel`: HELM's idealized runtime.
"""

from effllm.analyze.hardware import HARDWARE, Hardware, get_hardware, measure_hardware, save_hardware
from effllm.analyze.layer_costs import Bits, OpCost, step_costs
from effllm.analyze.memory import (
    InferenceMemory,
    TrainingMemory,
    inference_memory,
    kv_cache_bytes,
    optimizer_state_bytes,
    parameter_shapes,
    training_memory,
    weight_bytes,
)
from effllm.analyze.roofline import RooflineReport, analyze, roofline_fraction, roofline_tokens_per_s
from effllm.analyze.runtime_model import RuntimeModel, RuntimeSample, fit_runtime_model
from effllm.analyze.shapes import PRESETS, load_model_config

__all__ = [
    "HARDWARE",
    "PRESETS",
    "Bits",
    "Hardware",
    "InferenceMemory",
    "OpCost",
    "RooflineReport",
    "RuntimeModel",
    "RuntimeSample",
    "TrainingMemory",
    "analyze",
    "fit_runtime_model",
    "get_hardware",
    "inference_memory",
    "kv_cache_bytes",
    "load_model_config",
    "measure_hardware",
    "optimizer_state_bytes",
    "parameter_shapes",
    "roofline_fraction",
    "roofline_tokens_per_s",
    "save_hardware",
    "step_costs",
    "training_memory",
    "weight_bytes",
]
