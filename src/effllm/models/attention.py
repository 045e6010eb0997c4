"""Grouped-query self-attention with rotary embeddings and an optional sliding window.

The module computes q, k, v and rotates them; *where* attention reads its keys from is the job of an
attention backend passed as `attn`: None means a plain causal forward over the given tokens (training,
eval, parity tests); a backend (a contiguous KV cache, the engine's paged cache) is called as
`attn(layer_idx, q, k, v, window=..., scale=...)` and returns the attention output.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from effllm.kernels.attention import sdpa_attention
from effllm.models.config import ModelConfig
from effllm.models.fused_projections import current
from effllm.models.rope import apply_rotary


class AttentionBackend(Protocol):
    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, T, H, D]; k, v: [B, T, Hkv, D] for the new tokens. Returns [B, T, H, D]."""
        ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.window = config.sliding_windows[layer_idx]
        h, q_dim, kv_dim = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        self.q_proj = nn.Linear(h, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=config.o_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.__dict__.get("fused_qkv")  # models.fused_projections, in the engine
        if fused is not None and current(fused, self.q_proj, self.k_proj, self.v_proj) is not None:
            q, k, v = fused(x).split(fused.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attn is None:
            out = sdpa_attention(q, k, v, scale=self.scale, window=self.window)
        else:
            out = attn(self.layer_idx, q, k, v, window=self.window, scale=self.scale)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
