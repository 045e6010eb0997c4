"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8 quantization.

Per input channel j of linears that read the same normalised input, s_j = max|X_j|^a / max|W_:j|^(1-a)
(a = alpha, 0.5 by default; max over calibration tokens and over the rows of every linear in the group).
X / s is folded into the RMSNorm's weight and W * s into the linears, an exact transform of the float
model; per-token int8 activations then lose much less. As in the reference for Llama, q/k/v (after
input_layernorm) and gate/up (after post_attention_layernorm) are smoothed; o_proj and down_proj have no
norm before them and keep their inputs.
"""

from __future__ import annotations

import torch


class ChannelMax:
    """Running max |x| per input channel over the calibration tokens."""

    def __init__(self, in_features: int):
        self.value = torch.zeros(in_features)

    def add(self, x: torch.Tensor) -> None:
        self.value = torch.maximum(self.value, x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu())


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    w_max = torch.cat([w.float().abs() for w in weights]).amax(0).cpu()
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)
