"""`CausalLM`: the one Llama-family decoder every part of EffLLM runs.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight` ...), so checkpoints
load without renaming and what we save loads in transformers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from effllm.models.attention import Attention, AttentionBackend
from effllm.models.config import ModelConfig
from effllm.models.layers import RMSNorm, SwiGLUMLP
from effllm.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SwiGLUMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.dropout = 0.0  # on each residual branch, in training only (CausalLM.set_dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend | None = None
    ) -> torch.Tensor:
        x = x + self._drop(self.self_attn(self.input_layernorm(x), cos, sin, attn))
        return x + self._drop(self.mlp(self.post_attention_layernorm(x)))

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.dropout, training=True) if self.dropout and self.training else h


class DecoderStack(nn.Module):
    """Embeddings, decoder layers and the final norm (the `model.` prefix of HF checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.dropout = 0.0  # on the embeddings, in training only (CausalLM.set_dropout)
        # Per layer, the probability that a training sequence skips it (LayerSkip's layer dropout); None: off.
        self.layer_dropout: list[float] | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend | None = None
    ) -> torch.Tensor:
        return self.norm(self.run_layers(self.embed(input_ids), positions, attn))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., hidden] (with embedding dropout in training)."""
        x = self.embed_tokens(input_ids)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return x

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend | None = None,
        start: int = 0,
        end: int | None = None,
        collect: Collection[int] = (),
        outputs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decoder layers `start .. end - 1` over hidden states x [B, T, hidden] (before the final norm).

        The output of each layer index in `collect` is appended to `outputs` (the early-exit loss reads
        them). In training, `layer_dropout[l]` skips layer l for a random share of the batch's sequences
        (LayerSkip; set by `effllm.train.early_exit`).
        """
        cos, sin = self.rotary_emb(positions, x.dtype)
        end = len(self.layers) if end is None else end
        for i in range(start, end):
            layer = self.layers[i]
            p = self.layer_dropout[i] if self.layer_dropout and self.training else 0.0
            keep = None
            if p > 0:
                keep = (torch.rand(x.shape[0], device=x.device) >= p).nonzero()[:, 0]
                if len(keep) == 0:  # every sequence skips the layer
                    if i in collect:
                        outputs.append(x)
                    continue
            xs, cs, ss = (x, cos, sin) if keep is None else (x[keep], _rows(cos, keep), _rows(sin, keep))
            if self.gradient_checkpointing and self.training and attn is None:
                ys = checkpoint(layer, xs, cs, ss, use_reentrant=False)
            else:
                ys = layer(xs, cs, ss, attn)
            x = ys if keep is None else x.index_copy(0, keep, ys)
            if i in collect:
                outputs.append(x)
        return x


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of a per-sequence rotary table [B, T, D], or the table itself when shared ([1, T, D])."""
    return t if t.shape[0] == 1 else t[index]


class CausalLM(nn.Module):
    """Decoder-only language model for llama, qwen2 and mistral checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as transformers does: N(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype: the embeddings', which no compression layout changes."""
        return self.model.embed_tokens.weight.dtype

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in the backward pass instead of storing its activations."""
        self.model.gradient_checkpointing = enabled

    def set_dropout(self, p: float) -> None:
        """Dropout with probability `p` on the embeddings and on each attention and MLP output before it joins
        the residual stream (GPT-2's embd/resid dropout), active in `train()` mode only; 0 turns it off.

        A training-time regulariser, not part of the architecture: it is not saved in config.json, and
        inference (eval mode) is unchanged. Activation checkpointing replays the same dropout masks.
        """
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.model.dropout = p
        for layer in self.model.layers:
            layer.dropout = p

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, T] -> final normed hidden states [B, T, hidden]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        return self.model(input_ids, positions, attn)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over hidden states [..., hidden] -> [..., vocab]."""
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
        exit_layers: Sequence[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """input_ids: [B, T] token ids -> logits [B, T, vocab].

        With `exit_layers` (indices into the decoder layers), a list instead: per listed layer, the logits
        of its output through the shared final norm and LM head (an early exit; the last layer's index
        gives the ordinary logits). The early-exit loss trains on them through this call, so DDP sees it.
        """
        if exit_layers is None:
            return self.logits(self.hidden_states(input_ids, positions, attn))
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        wanted = sorted(set(exit_layers))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.config.num_hidden_layers:
            raise ValueError(
                f"exit_layers must index the {self.config.num_hidden_layers} layers, got {exit_layers}"
            )
        outputs: list[torch.Tensor] = []
        self.model.run_layers(
            self.model.embed(input_ids), positions, attn, 0, wanted[-1] + 1, wanted, outputs
        )
        by_layer = dict(zip(wanted, outputs, strict=True))
        return [self.logits(self.model.norm(by_layer[i])) for i in exit_layers]
