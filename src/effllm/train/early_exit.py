"""LayerSkip's training recipe (arXiv 2404.16710): layer dropout rising with depth and an early-exit loss.

`effllm train --method early-exit` makes a model whose shallow layers already predict through the shared
final norm and LM head, which is what the early-exit proposer (`--speculative-method early-exit`) and
SkipDecode (`--skip-decode`) run on.

- Layer dropout: in training, layer l is skipped for each sequence of the batch with probability
  p_l = p_max * s(l / (L - 1)), s(x) = 2^x - 1 by default (`exp`; also `linear` x and `uniform` 1), as
  torchtune's `create_layer_dropout_modules`. Off at evaluation.
- Early-exit loss: the cross-entropy of every enabled exit layer's logits, weighted by w_l (l + 1 for
  `linear`, 1 for `uniform`; non-final layers times `exit_scale`), the weights normalised to sum to 1.
  The last layer is always enabled.
- Curriculum (which exits are enabled at step s): `rotational` (layers l with (l - s) % every == 0, the
  mask rolling one layer per step), `gradual` (layer l from step fraction * (L - l) / L * steps on, the
  deepest first) or `none` (all layers, every step).

Options (`--method-options k=v`): dropout_max (0.1), dropout_scale (exp), loss_scale (linear),
exit_scale (1.0), curriculum (rotational), every (2), fraction (0.5).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import ConfigError
from effllm.train.packing import IGNORE_INDEX

DROPOUT_SCALES = ("exp", "linear", "uniform")
LOSS_SCALES = ("linear", "uniform")
CURRICULA = ("rotational", "gradual", "none")


def layer_dropout_rates(num_layers: int, p_max: float, scale: str = "exp") -> list[float]:
    """p_l for l = 0 .. L - 1: p_max * s(l / (L - 1))."""
    if not 0 <= p_max < 1:
        raise ConfigError(f"dropout_max must be in [0, 1), got {p_max}")
    if scale not in DROPOUT_SCALES:
        raise ConfigError(f"dropout_scale must be one of {', '.join(DROPOUT_SCALES)}, got {scale!r}")
    fn = {"exp": lambda x: 2**x - 1, "linear": lambda x: x, "uniform": lambda x: 1.0}[scale]
    return [p_max * fn(i / (num_layers - 1) if num_layers > 1 else 1.0) for i in range(num_layers)]


def exit_weights(
    layers: list[int], num_layers: int, loss_scale: str = "linear", exit_scale: float = 1.0
) -> list[float]:
    """Normalised loss weights of the enabled exit layers (in the order given)."""
    if loss_scale not in LOSS_SCALES:
        raise ConfigError(f"loss_scale must be one of {', '.join(LOSS_SCALES)}, got {loss_scale!r}")
    raw = [
        (i + 1 if loss_scale == "linear" else 1.0) * (1.0 if i == num_layers - 1 else exit_scale)
        for i in layers
    ]
    total = sum(raw)
    return [w / total for w in raw]


def enabled_exits(
    step: int, steps: int, num_layers: int, curriculum: str, every: int, fraction: float
) -> list[int]:
    """Exit layers whose loss counts at optimizer step `step` (0-based); the last layer always."""
    if curriculum == "none":
        layers = range(num_layers)
    elif curriculum == "rotational":
        layers = [i for i in range(num_layers) if (i - step) % every == 0]
    elif curriculum == "gradual":
        layers = [i for i in range(num_layers) if step >= fraction * (num_layers - i) / num_layers * steps]
    else:
        raise ConfigError(f"curriculum must be one of {', '.join(CURRICULA)}, got {curriculum!r}")
    return sorted({*layers, num_layers - 1})


def early_exit_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], layers: list[int], weights: list[float]
) -> torch.Tensor:
    """Sum over target tokens of the weighted per-exit cross-entropies (the trainer divides by the count)."""
    labels = batch["labels"].flatten()
    total = 0.0
    for logits, w in zip(model(batch["input_ids"], exit_layers=layers), weights, strict=True):
        total = total + w * F.cross_entropy(
            logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total


class EarlyExitTraining:
    """The callback `--method early-exit` adds: sets layer dropout, and the enabled exits each step."""

    def __init__(
        self,
        trainer: Any,
        dropout_max: float = 0.1,
        dropout_scale: str = "exp",
        loss_scale: str = "linear",
        exit_scale: float = 1.0,
        curriculum: str = "rotational",
        every: int = 2,
        fraction: float = 0.5,
    ):
        from effllm.train.distributed import unwrap

        model = unwrap(trainer.model)
        self.num_layers = model.config.num_hidden_layers
        if every < 1 or not 0 <= fraction <= 1 or exit_scale < 0:
            raise ConfigError(
                f"need every >= 1, 0 <= fraction <= 1, exit_scale >= 0; got {every}, {fraction}, {exit_scale}"
            )
        exit_weights([0], self.num_layers, loss_scale)  # check the name now
        enabled_exits(0, 1, self.num_layers, curriculum, every, fraction)
        model.model.layer_dropout = layer_dropout_rates(self.num_layers, dropout_max, dropout_scale)
        self.trainer, self.steps = trainer, trainer.config.steps
        self.loss_scale, self.exit_scale = loss_scale, exit_scale
        self.curriculum, self.every, self.fraction = curriculum, every, fraction
        self.layers = [self.num_layers - 1]
        trainer.loss_fn = self.loss

    def on_step_begin(self, step: int) -> None:
        self.layers = enabled_exits(
            step, self.steps, self.num_layers, self.curriculum, self.every, self.fraction
        )

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        metrics["exit_layers"] = len(self.layers)
        if "eval_loss" in metrics:  # the trainer evaluated: add each exit's held-out loss
            metrics["eval_exit_loss"] = [round(x, 4) for x in self.evaluate_exits()]

    @torch.no_grad()
    def evaluate_exits(self) -> list[float]:
        """Held-out mean loss per target token of every layer's early exit (the last is `eval_loss`)."""
        trainer, cfg = self.trainer, self.trainer.config
        env, model = trainer.env, trainer.model
        totals = torch.zeros(self.num_layers + 1, device=env.device, dtype=torch.float64)
        model.eval()
        layers = list(range(self.num_layers))
        for batch in trainer.data.held_out_batches(
            cfg.batch_size, env.rank, env.world_size, cfg.eval_batches
        ):
            batch = {k: v.to(env.device) for k, v in batch.items()}
            labels = batch["labels"].flatten()
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                exits = model(batch["input_ids"], exit_layers=layers)
            for i, logits in enumerate(exits):
                totals[i] += F.cross_entropy(
                    logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum"
                ).double()
            totals[-1] += int((labels != IGNORE_INDEX).sum())
        model.train()
        env.all_reduce_sum(totals)
        return (totals[:-1] / totals[-1].clamp(min=1)).tolist()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = exit_weights(self.layers, self.num_layers, self.loss_scale, self.exit_scale)
        return early_exit_loss(model, batch, self.layers, weights)
