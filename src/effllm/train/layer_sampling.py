"""Layer sampling: train only a few transformer blocks at a time (LISA), chosen by outlier ratio (OwLore).

LISA (Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning", 2024):
every K steps all blocks freeze and γ of them, drawn uniformly without replacement, train; the
embeddings and the head (everything outside the blocks) always train. OwLore (Li et al., "OwLore:
Outlier-weighed Layerwise Sampled Low-Rank Projection", 2024): block ℓ is drawn with probability
p_ℓ ∝ its outlier ratio (OWL, Yin et al. 2024), and the sampled blocks train with GaLore.

Works on any model with blocks at `model.model.layers` (Hugging Face Llama naming, as ours).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from effllm.core.errors import ConfigError
from effllm.optim import release_state, split_param_groups, step_seed

# OwLore's GaLore settings for the sampled blocks (pixeli99/OwLore, finetuner.py: rank 256, gap 100).
OWLORE_LOW_RANK = {"rank": 256, "update_proj_gap": 100, "scale": 1.0, "proj_type": "std"}


class LayerSampler:
    """A trainer callback that keeps `num_active_layers` blocks trainable and resamples them every interval.

    The trainer calls `on_step_begin(step, optimizer)` before each optimizer step. At the first call and
    whenever `step` enters a new interval of `interval_steps` steps, γ = `num_active_layers` blocks are
    drawn without replacement with probabilities `probabilities` (uniform by default); a block drawn is
    as likely as in `numpy.random.choice(L, γ, replace=False, p=probabilities)`, which is what LMFlow and
    OwLore call. Every other block gets `requires_grad=False`, its gradients are dropped, and the
    optimizer state of each block that stops training is released (LMFlow keeps it: LMFlow#729): a block
    drawn again later starts with fresh moments (and a fresh GaLore projector). The draw for an interval
    depends only on `seed` and the interval's index, so a resumed run draws the same blocks.

    The optimizer must hold every block's parameters, frozen or not: build it from `param_groups()`
    (which includes frozen ones and, for OwLore, the GaLore keys), or before the first `on_step_begin`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_active_layers: int = 2,
        interval_steps: int = 20,
        probabilities: Sequence[float] | None = None,
        seed: int = 0,
        low_rank: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.layers = _blocks(model)
        count = len(self.layers)
        if not 1 <= num_active_layers <= count:
            raise ConfigError(
                f"num_active_layers must be between 1 and the model's {count} blocks, got {num_active_layers}"
            )
        if interval_steps < 1:
            raise ConfigError(f"interval_steps must be >= 1, got {interval_steps}")
        weights = (
            torch.ones(count)
            if probabilities is None
            else torch.as_tensor(probabilities, dtype=torch.float64)
        )
        if (
            weights.shape != (count,)
            or bool((weights < 0).any())
            or int((weights > 0).sum()) < num_active_layers
        ):
            raise ConfigError(
                f"probabilities must be {count} non-negative numbers with at least "
                f"{num_active_layers} positive, got {list(weights.tolist())}"
            )
        self.probabilities = (weights / weights.sum()).double()
        self.num_active_layers = num_active_layers
        self.interval_steps = interval_steps
        self.seed = seed
        self.low_rank = dict(low_rank) if low_rank is not None else None
        self.active_layers: tuple[int, ...] = ()
        self._interval: int | None = None

    @classmethod
    def lisa(
        cls, model: nn.Module, num_active_layers: int = 2, interval_steps: int = 20, seed: int = 0
    ) -> "LayerSampler":
        """LISA: uniform sampling (LMFlow defaults γ = 2, K = 20), plain optimizer groups."""
        return cls(model, num_active_layers, interval_steps, seed=seed)

    @classmethod
    def owlore(
        cls,
        model: nn.Module,
        num_active_layers: int = 5,
        interval_steps: int = 50,
        threshold: float = 13.0,
        seed: int = 0,
        low_rank: Mapping[str, Any] | None = OWLORE_LOW_RANK,
        input_norms: Mapping[str, torch.Tensor] | None = None,
    ) -> "LayerSampler":
        """OwLore: p_ℓ ∝ outlier ratio of block ℓ (`outlier_ratios`), GaLore groups; γ, K of its script."""
        ratios = outlier_ratios(model, threshold, input_norms)
        if sum(r > 0 for r in ratios) < num_active_layers:
            raise ConfigError(
                f"only {sum(r > 0 for r in ratios)} blocks have weights above {threshold}x their "
                f"block's mean magnitude, fewer than the {num_active_layers} to sample: lower the threshold"
            )
        return cls(model, num_active_layers, interval_steps, ratios, seed, low_rank)

    def on_step_begin(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Resample if `step` starts a new interval (True if it did); frozen blocks' state is released."""
        interval = step // self.interval_steps
        if interval == self._interval:
            return False
        self._interval = interval
        self._activate(self.sample(interval), optimizer)
        return True

    def sample(self, interval: int) -> tuple[int, ...]:
        """The blocks that train during `interval` (sorted), a fixed function of the seed and the interval."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, interval))
        drawn = torch.multinomial(
            self.probabilities, self.num_active_layers, replacement=False, generator=generator
        )
        return tuple(sorted(drawn.tolist()))

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups over all parameters, frozen ones included; OwLore's carry GaLore keys."""
        return split_param_groups(
            self.model.named_parameters(), weight_decay, low_rank=self.low_rank, trainable_only=False
        )

    def _activate(self, active: tuple[int, ...], optimizer: torch.optim.Optimizer | None) -> None:
        released = []
        for index, layer in enumerate(self.layers):
            trains = index in active
            for p in layer.parameters():
                if p.requires_grad and not trains:
                    released.append(p)
                    p.grad = None
                p.requires_grad_(trains)
        if optimizer is not None:
            release_state(optimizer, released)
        self.active_layers = active


def outlier_ratios(
    model: nn.Module, threshold: float = 13.0, input_norms: Mapping[str, torch.Tensor] | None = None
) -> list[float]:
    """OWL's layerwise outlier distribution: per block, the share of weights that are outliers.

    For every `nn.Linear` in a block the score of weight W_ij is |W_ij|·‖X_j‖₂ (Wanda's metric) and a
    weight is an outlier when its score exceeds `threshold` × the mean score over the whole block (OWL,
    Yin et al. 2024; OwLore uses M = 13). Without `input_norms` (module name -> ‖X_j‖₂ over
    calibration tokens, e.g. "model.layers.0.mlp.down_proj") the scores are the weights' magnitudes
    alone: the ratio is then computed from the weights only.
    """
    ratios = []
    for index, layer in enumerate(_blocks(model)):
        scores = []
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                score = module.weight.detach().abs().float()
                if input_norms is not None:
                    score = (
                        score * input_norms[f"model.layers.{index}.{name}"].float().to(score.device)[None, :]
                    )
                scores.append(score)
        total = sum(s.numel() for s in scores)
        if total == 0:
            raise ConfigError(f"block {index} has no nn.Linear weights to measure outliers in")
        cutoff = threshold * sum(float(s.sum()) for s in scores) / total
        ratios.append(sum(int((s > cutoff).sum()) for s in scores) / total)
    return ratios


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"layer sampling needs transformer blocks at model.model.layers (Llama naming); "
            f"{type(model).__name__} has none"
        )
    return layers
