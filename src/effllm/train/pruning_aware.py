"""Pruning-aware pretraining (EfficientLLM, arXiv 2502.06663) in minimal faithful form: the model shrinks
to a target size while it trains, and the run ends with a plain smaller checkpoint.

    effllm train --model-config C --method pruning-aware --target-params 9.05e6 ...

EfficientLLM runs LLM-Pruner-style saliency and SparseGPT-style second-order updates continuously during
pretraining; its pretraining code is not published, so this is our reading of it:

- Groups are LLM-Pruner's (`effllm.compress.structured`): MLP channels (gate/up rows, down column) and KV
  groups (k/v head, the q heads reading it, their o_proj columns), the same number removed in every layer
  so the widths stay uniform.
- Saliency is measured during training: at every optimizer step (before the update, on the step's
  gradients) each group's Taylor saliency (`importance` first |w g|, second |w g^2 w|, or mix) enters an
  exponential moving average (`ema`, 0.9).
- Removal schedule: `removals` events evenly spaced from step `start` * steps to `end` * steps (fractions);
  after event t of T, each layer has lost round(n * (1 - (1 - t / T)^3)) of the n groups the target
  needs (the cubic schedule of gradual pruning, Zhu & Gupta 2017: fast early, gentle late).
- At each event, the lowest-EMA live groups of each layer go, with the group OBS update of the weights
  they feed (`compress.structured.obs_remove_columns`: down_proj's remaining columns for MLP channels,
  o_proj's for heads) from H = X^T X of those layers' inputs over `calibration_batches` micro-batches of
  the training stream at that point. Removed groups are held at exactly zero (they then get no gradient).
- `--target-params N` sets the final parameter count; `kv_group_ratio` (default 0) the share of KV groups
  removed, and the MLP width is chosen to land at or just under N.
- The final model is written without the removed groups (`remove_groups`): an ordinary checkpoint whose
  config has the smaller widths. Checkpoints in between hold the full-width model with the zeros, and
  the callback's state (EMA, removed groups) resumes exactly.

Options (`--method-options k=v`): kv_group_ratio (0), start (0.1), end (0.6), removals (16),
importance (first), ema (0.9), calibration_batches (2), damp (0.01).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from effllm.compress.structured import (
    IMPORTANCE_KINDS,
    group_importance,
    obs_remove_columns,
    remove_groups,
    weight_saliency,
)
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig
from effllm.models.transformer import CausalLM


def parameter_count(config: ModelConfig) -> int:
    """Parameters of a model of `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in CausalLM(config).parameters())


def target_widths(config: ModelConfig, target_params: int, kv_group_ratio: float = 0.0) -> tuple[int, int]:
    """(MLP channels, KV groups) each layer must lose so the model has at most `target_params`."""
    kv = config.num_key_value_heads
    n_kv = kv_group_ratio * kv
    if not 0 <= kv_group_ratio < 1 or abs(n_kv - round(n_kv)) > 1e-9:
        raise ConfigError(
            f"kv_group_ratio must be a multiple of 1/{kv} in [0, 1) (uniform widths), got {kv_group_ratio}"
        )
    n_kv = round(n_kv)
    per_group = config.num_attention_heads // kv
    smaller = dataclasses.replace(
        config, num_key_value_heads=kv - n_kv, num_attention_heads=(kv - n_kv) * per_group
    )
    full = parameter_count(config)
    after_kv = parameter_count(smaller)
    one_channel = after_kv - parameter_count(
        dataclasses.replace(smaller, intermediate_size=smaller.intermediate_size - 1)
    )
    if target_params >= full:
        raise ConfigError(f"--target-params {target_params:,} is not below the model's {full:,} parameters")
    n_c = max(0, math.ceil((after_kv - target_params) / one_channel))
    if n_c >= config.intermediate_size:
        smallest = after_kv - (config.intermediate_size - 1) * one_channel
        raise ConfigError(
            f"--target-params {target_params:,} is below the smallest model these groups can make "
            f"({smallest:,} with one MLP channel per layer); raise it or remove KV groups (kv_group_ratio)"
        )
    return n_c, n_kv


def removal_steps(steps: int, start: float, end: float, removals: int) -> list[int]:
    """The 0-based steps (before which) each removal event happens, evenly from start*steps to end*steps."""
    if not 0 <= start <= end < 1:
        raise ConfigError(f"pruning-aware: need 0 <= start <= end < 1, got start={start} end={end}")
    if removals < 1:
        raise ConfigError(f"pruning-aware: removals must be at least 1, got {removals}")
    first, last = start * steps, end * steps
    out = sorted({int(round(first + (last - first) * t / max(removals - 1, 1))) for t in range(removals)})
    if removals == 1:
        out = [int(round(last))]
    return out


def cubic_share(event: int, events: int) -> float:
    """Share of the target removed after `event` (1-based) of `events`: 1 - (1 - t/T)^3."""
    return 1.0 - (1.0 - event / events) ** 3


class PruningAwareTraining:
    """The `pruning-aware` method's callback (see the module docstring)."""

    def __init__(
        self,
        trainer: Any,
        kv_group_ratio: float = 0.0,
        start: float = 0.1,
        end: float = 0.6,
        removals: int = 16,
        importance: str = "first",
        ema: float = 0.9,
        calibration_batches: int = 2,
        damp: float = 0.01,
    ):
        from effllm.optim import requires_backward
        from effllm.train.distributed import unwrap

        cfg = trainer.config
        if not cfg.target_params:
            raise ConfigError("--method pruning-aware needs --target-params (the final parameter count)")
        if cfg.parallel == "fsdp" and trainer.env.enabled:
            raise ConfigError(
                "--method pruning-aware rewrites whole weight columns; run it with --parallel ddp"
            )
        if not requires_backward(trainer.optimizer):
            raise ConfigError(
                f"--method pruning-aware measures saliency from gradients; --optimizer {cfg.optimizer} has none"
            )
        if importance not in IMPORTANCE_KINDS:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {importance!r}")
        if not 0 <= ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {ema}")
        self.trainer, self.model = trainer, unwrap(trainer.model)
        c = self.model.config
        self.importance, self.ema, self.damp = importance, float(ema), float(damp)
        self.calibration_batches = int(calibration_batches)
        self.n_channels, self.n_kv = target_widths(c, int(cfg.target_params), kv_group_ratio)
        self.events = removal_steps(cfg.steps, start, end, int(removals))
        layers = c.num_hidden_layers
        self.dead_channels = [torch.zeros(c.intermediate_size, dtype=torch.bool) for _ in range(layers)]
        self.dead_kv = [torch.zeros(c.num_key_value_heads, dtype=torch.bool) for _ in range(layers)]
        self.score_channels = [torch.zeros(c.intermediate_size) for _ in range(layers)]
        self.score_kv = [torch.zeros(c.num_key_value_heads) for _ in range(layers)]
        self.events_done = 0
        self.params = {n: p for n, p in self.model.named_parameters() if ".layers." in n and p.dim() == 2}
        trainer.optimizer.register_step_pre_hook(lambda *_: self._measure())
        trainer.optimizer.register_step_post_hook(lambda *_: self.apply_masks())

    # ------------------------------------------------------------------ saliency during training
    @torch.no_grad()
    def _measure(self) -> None:
        saliency = {}
        for n, p in self.params.items():
            if p.grad is None:
                return  # a step without gradients (e.g. every parameter frozen): nothing to learn from
            g = p.grad.float()
            saliency[n] = weight_saliency(p.detach().float(), g, g * g, self.importance)
        for i, (mlp, kv) in enumerate(group_importance(self.model, saliency)):
            for score, new in ((self.score_channels[i], mlp), (self.score_kv[i], kv)):
                score.mul_(self.ema).add_(new.cpu(), alpha=1 - self.ema)

    # ------------------------------------------------------------------ the schedule
    def removed_after(self, event: int) -> tuple[int, int]:
        """(MLP channels, KV groups) removed per layer once `event` (1-based) events have happened."""
        share = cubic_share(event, len(self.events))
        return round(self.n_channels * share), round(self.n_kv * share)

    def on_step_begin(self, step: int) -> None:
        while self.events_done < len(self.events) and self.events[self.events_done] <= step:
            self.events_done += 1
            self._remove(*self.removed_after(self.events_done))

    @torch.no_grad()
    def _remove(self, channels: int, kv: int) -> None:
        """Grow each layer's removed set to `channels` MLP channels and `kv` KV groups, with OBS updates."""
        new_c = [
            _lowest_live(s, d, channels) for s, d in zip(self.score_channels, self.dead_channels, strict=True)
        ]
        new_kv = [_lowest_live(s, d, kv) for s, d in zip(self.score_kv, self.dead_kv, strict=True)]
        if not any(len(x) for x in new_c + new_kv):
            return
        hessians = self._input_hessians()
        c = self.model.config
        span = c.num_attention_heads // c.num_key_value_heads * c.head_dim
        for i, layer in enumerate(self.model.model.layers):
            for linear, new, dead, width in (
                (layer.mlp.down_proj, new_c[i], self.dead_channels[i], 1),
                (layer.self_attn.o_proj, new_kv[i], self.dead_kv[i], span),
            ):
                if len(new) == 0:
                    continue
                cols = (new[:, None] * width + torch.arange(width)).flatten()
                w = obs_remove_columns(
                    linear.weight, hessians[id(linear)], cols.to(linear.weight.device), self.damp
                )
                linear.weight.copy_(w.to(linear.weight.dtype))
                dead[new] = True
        self.apply_masks()
        removed = self.removed_after(self.events_done)
        self.trainer._print(
            f"pruning-aware: event {self.events_done}/{len(self.events)}: {removed[0]}/{self.n_channels} MLP "
            f"channels and {removed[1]}/{self.n_kv} KV groups removed per layer"
        )

    def _input_hessians(self) -> dict[int, torch.Tensor]:
        """H = X^T X of down_proj's and o_proj's inputs over a few micro-batches of the training stream."""
        cfg, trainer = self.trainer.config, self.trainer
        targets = [
            m for layer in self.model.model.layers for m in (layer.mlp.down_proj, layer.self_attn.o_proj)
        ]
        sums = {id(m): torch.zeros(m.in_features, m.in_features, device=m.weight.device) for m in targets}

        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().flatten(0, -2)
            sums[id(module)] += x.T @ x

        handles = [m.register_forward_pre_hook(hook) for m in targets]
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(self.calibration_batches):
                batch = trainer.data.micro_batch(trainer.samples_seen + b * cfg.batch_size, cfg.batch_size)
                self.model(batch["input_ids"].to(self.model.device))
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return sums

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Hold every removed group at exactly zero."""
        c = self.model.config
        d, span = c.head_dim, c.num_attention_heads // c.num_key_value_heads * c.head_dim
        for i, layer in enumerate(self.model.model.layers):
            ch, kv = self.dead_channels[i], self.dead_kv[i]
            if ch.any():
                ch = ch.to(layer.mlp.down_proj.weight.device)
                for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    _zero_rows(lin, ch)
                layer.mlp.down_proj.weight[:, ch] = 0
            if kv.any():
                kv = kv.to(layer.self_attn.o_proj.weight.device)
                attn = layer.self_attn
                _zero_rows(attn.k_proj, kv.repeat_interleave(d))
                _zero_rows(attn.v_proj, kv.repeat_interleave(d))
                _zero_rows(attn.q_proj, kv.repeat_interleave(span))
                attn.o_proj.weight[:, kv.repeat_interleave(span)] = 0

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self.apply_masks()  # for optimizers that update outside step()
        metrics["params"] = self.live_parameters()

    def live_parameters(self) -> int:
        """Parameters of the model with the groups removed so far (what the final model will have)."""
        c = self.model.config
        channels, kv = int(self.dead_channels[0].sum()), int(self.dead_kv[0].sum())
        per_group = c.num_attention_heads // c.num_key_value_heads
        return parameter_count(
            dataclasses.replace(
                c,
                intermediate_size=c.intermediate_size - channels,
                num_key_value_heads=c.num_key_value_heads - kv,
                num_attention_heads=(c.num_key_value_heads - kv) * per_group,
            )
        )

    # ------------------------------------------------------------------ the final model
    def final_model(self, model: CausalLM) -> CausalLM:
        """`model` without the removed groups: the plain smaller checkpoint the run writes."""
        drop_c = [d.nonzero().flatten() for d in self.dead_channels]
        drop_kv = [d.nonzero().flatten() for d in self.dead_kv]
        small = remove_groups(model, drop_c, drop_kv)
        self.trainer._print(
            f"pruning-aware: final model {parameter_count(small.config):,} parameters "
            f"(intermediate_size {small.config.intermediate_size}, {small.config.num_key_value_heads} KV heads)"
        )
        return small

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "events": list(self.events),
            "targets": (self.n_channels, self.n_kv),
            "events_done": self.events_done,
            "dead_channels": [d.clone() for d in self.dead_channels],
            "dead_kv": [d.clone() for d in self.dead_kv],
            "score_channels": [s.clone() for s in self.score_channels],
            "score_kv": [s.clone() for s in self.score_kv],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["events"] != self.events or tuple(state["targets"]) != (self.n_channels, self.n_kv):
            raise ConfigError(
                f"this pruning-aware run removes groups at steps {state['events']}; --steps sets that "
                "schedule, so resume it with its own --steps"
            )
        self.events_done = state["events_done"]
        for name in ("dead_channels", "dead_kv", "score_channels", "score_kv"):
            setattr(self, name, [t.clone() for t in state[name]])


def _lowest_live(score: torch.Tensor, dead: torch.Tensor, total: int) -> torch.Tensor:
    """Indices of the live groups with the lowest score, enough that `total` are dead afterwards."""
    more = total - int(dead.sum())
    if more <= 0:
        return torch.zeros(0, dtype=torch.long)
    masked = score.masked_fill(dead, math.inf)
    return masked.topk(more, largest=False).indices.sort().values


def _zero_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    linear.weight[rows] = 0
    if linear.bias is not None:
        linear.bias[rows] = 0
