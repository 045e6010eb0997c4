"""Model compression: weight quantization (`quantize_` with the W8A16, W4A16, W8A8 schemes and QoQ's W4A8 and
W4A8KV4)."""

from effllm.compress.calibration import calibration_ids
from effllm.compress.schemes import SCHEMES, W4A8, W4A8KV4, W4A16, W8A8, W8A16, QuantizeConfig, quantize_

__all__ = [
    "SCHEMES",
    "W4A8",
    "W4A8KV4",
    "W4A16",
    "W8A8",
    "W8A16",
    "QuantizeConfig",
    "calibration_ids",
    "quantize_",
]
