"""Rotary position embeddings with the scalings Llama-family checkpoints use.

Each `rope_type` maps to inverse frequencies (and an attention factor that scales cos/sin), computed
as Hugging Face transformers does so that logits match: default, linear (position interpolation),
dynamic (NTK-aware, recomputed when positions pass the trained length), llama3 (wavelength-banded
interpolation) and yarn (NTK-by-parts ramp plus an attention temperature).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effllm.kernels import cpu_elementwise
from effllm.models.config import ModelConfig


def _base_inv_freq(theta: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    original = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the dimension rotates fast enough to keep its original frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given positions; `apply_rotary` rotates q and k with them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = dict(config.rope_scaling)
        self.rope_type = config.rope_type
        self.max_position_embeddings = config.max_position_embeddings
        self.attention_factor = 1.0
        inv_freq = _base_inv_freq(self.theta, self.dim)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3(inv_freq, self.scaling)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn(
                self.theta, self.dim, self.scaling, self.max_position_embeddings
            )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        # NTK-aware scaling: grow the base once positions pass the trained length.
        factor, max_pos = self.scaling["factor"], self.max_position_embeddings
        base = self.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim, self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] integer tensor -> cos, sin: [B, T, head_dim] in `dtype`."""
        inv_freq = self.inv_freq
        if self.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq = self._dynamic_inv_freq(seq_len)
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D]; cos, sin: [B, T, D]."""
    if cpu_elementwise.applies(x):  # inference on the CPU: one C pass, the same rounding
        out = cpu_elementwise.rotary(x, cos, sin)
        if out is not None:
            return out
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin
