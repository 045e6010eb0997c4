"""Zeroth-order optimizers: MeZO's ZO-SGD and the ZO-Bench family (sign, momentum, conservative, Adam).

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO, NeurIPS 2023), and
Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark"
(ZO-Bench, ICML 2024). Every step estimates the directional derivative along a random z from two
forward passes (SPSA, MeZO Definition 1, eq. 1):
    two_side:  ĝ = (L(θ + εz) − L(θ − εz)) / 2ε          one_side:  ĝ = (L(θ + εz) − L(θ)) / ε
and ĝ·z estimates ∇L (for Gaussian z, E[ĝz] = ∇L up to O(ε²)). z is regenerated from a seed and the
parameters are perturbed in place (MeZO Algorithm 1), so no `.grad`, no activations for backward and
no copy of θ exist: memory is inference memory (plus one or two buffers for momentum or Adam).

Usage: `loss = opt.step(closure)`; the closure evaluates the loss of the current batch and is called
under `torch.no_grad()`, two or more times per step, so it must be deterministic (same batch, dropout
off: call `model.eval()`). `step` returns the loss at θ before the update (the mean of the two
evaluations for two_side, which estimates it to O(ε²)). In-place perturbation and restoration do not
restore θ bit-exactly; the drift is a few ulps of εz per step (visible in bf16, as in MeZO).
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from effllm.core.errors import ConfigError
from effllm.optim.adam import adam_direction
from effllm.optim.forward_only import ForwardOnlyOptimizer, gaussian_directions

PERTURBATIONS = ("two_side", "one_side")

# (a, b) per group: the affine move θ ← a·θ + b·z.
Move = Callable[[dict[str, Any]], tuple[float, float]]


class ZOSGD(ForwardOnlyOptimizer):
    """MeZO (ZO-SGD): θ ← θ − lr·(ĝ·z + λθ), with z regenerated from the step's seed (MeZO Alg. 1).

    Weight decay λ follows MeZO (coupled, as in SGD); the registry sets it to 0 for 1-D parameters
    (norms and biases), as MeZO does. MeZO's recommended ε is 1e-3 and lr 1e-6 to 1e-7 for full
    fine-tuning.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        zo_eps: float = 1e-3,
        perturbation: str = "two_side",
        seed: int = 0,
        **defaults: Any,
    ):
        if zo_eps <= 0:
            raise ConfigError(f"zo_eps must be > 0, got {zo_eps}")
        if perturbation not in PERTURBATIONS:
            raise ConfigError(f"perturbation {perturbation!r} is not one of {', '.join(PERTURBATIONS)}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, **defaults}, seed)
        self.zo_eps = zo_eps
        self.perturbation = perturbation
        self.projected_grad: float | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Estimate ĝ with two forward passes and update in place; returns the loss before the update."""
        self._require(closure)
        seed = self.next_seed()
        self.projected_grad, loss = self._estimate(closure, seed)
        self._update(closure, seed, self.projected_grad)
        return torch.tensor(loss)

    def _estimate(self, closure: Callable[[], torch.Tensor], seed: int) -> tuple[float, float]:
        """(ĝ, loss at θ) by SPSA; leaves θ where it was (up to rounding)."""
        eps = self.zo_eps
        if self.perturbation == "two_side":
            self._move(seed, _shift(eps))
            loss_plus = float(closure())
            self._move(seed, _shift(-2 * eps))
            loss_minus = float(closure())
            self._move(seed, _shift(eps))
            return (loss_plus - loss_minus) / (2 * eps), (loss_plus + loss_minus) / 2
        loss = float(closure())
        self._move(seed, _shift(eps))
        loss_plus = float(closure())
        self._move(seed, _shift(-eps))
        return (loss_plus - loss) / eps, loss

    def _update(self, closure: Callable[[], torch.Tensor], seed: int, projected_grad: float) -> None:
        self._move(seed, _sgd(projected_grad))

    def _move(self, seed: int, move: Move) -> None:
        """θ ← a·θ + b·z for every trainable parameter, z regenerated from `seed`."""
        pairs = list(self.trainable())
        for (group, p), z in zip(pairs, gaussian_directions([p for _, p in pairs], seed), strict=True):
            a, b = move(group)
            if a != 1.0:
                p.mul_(a)
            p.add_(z, alpha=b)


class ZOSGDSign(ZOSGD):
    """ZO-SGD-Sign (ZO-Bench): θ ← θ − lr·(sign(ĝ)·z + λθ).

    As in ZO-Bench's code (`np.sign(projected_grad) * z`), the sign is taken of the scalar ĝ, so the step
    has norm lr·‖z‖ whatever the magnitude of ĝ. (The signSGD form sign(ĝz), elementwise, is the other
    reading of the paper; the benchmark's numbers come from this one.)
    """

    def _update(self, closure: Callable[[], torch.Tensor], seed: int, projected_grad: float) -> None:
        self._move(seed, _sgd(float((projected_grad > 0) - (projected_grad < 0))))


class ZOSGDMomentum(ZOSGD):
    """ZO-SGD-MMT (ZO-Bench): torch SGD with momentum on the estimate ĝz.

    b ← μ·b + (ĝz + λθ) (b = ĝz + λθ on the first step), θ ← θ − lr·b; one parameter-sized buffer.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, momentum: float = 0.9, **kwargs: Any):
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, lr=lr, momentum=momentum, **kwargs)

    def _update(self, closure: Callable[[], torch.Tensor], seed: int, projected_grad: float) -> None:
        pairs = list(self.trainable())
        for (group, p), z in zip(pairs, gaussian_directions([p for _, p in pairs], seed), strict=True):
            d = z.mul_(projected_grad)
            if group["weight_decay"]:
                d.add_(p, alpha=group["weight_decay"])
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(d)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])


class ZOSGDConservative(ZOSGD):
    """ZO-SGD-Cons (ZO-Bench): take the ZO-SGD step, the opposite step, or none, whichever has lowest loss.

    With L₀ = L(θ), candidates θ₋ = θ − lr(ĝz + λθ) and θ₊ = θ + lr(ĝz + λθ) are evaluated on the same
    batch and θ moves to the best of the three, so the batch loss never increases (up to the rounding
    of moving back in place). Each candidate is an affine map a·θ + b·z of the starting point, so moving
    between them needs neither a copy of θ nor of z. Costs five forward passes per step.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One conservative step; returns L(θ) before it (the loss after it is never larger)."""
        self._require(closure)
        seed = self.next_seed()
        loss = float(closure())
        self.projected_grad, _ = self._estimate(closure, seed)
        g = self.projected_grad

        def descent(group: dict[str, Any]) -> tuple[float, float]:
            return 1.0 - group["lr"] * group["weight_decay"], -group["lr"] * g

        def ascent(group: dict[str, Any]) -> tuple[float, float]:
            return 1.0 + group["lr"] * group["weight_decay"], group["lr"] * g

        def stay(group: dict[str, Any]) -> tuple[float, float]:
            return 1.0, 0.0

        self._move(seed, _between(stay, descent))
        loss_descent = float(closure())
        self._move(seed, _between(descent, ascent))
        loss_ascent = float(closure())
        best = min((loss, stay), (loss_descent, descent), (loss_ascent, ascent), key=lambda c: c[0])[1]
        if best is not ascent:
            self._move(seed, _between(ascent, best))
        return torch.tensor(loss)


class ZOAdam(ZOSGD):
    """ZO-Adam (ZO-Bench): AdamW on the estimate ĝz (two parameter-sized moment buffers).

    Decoupled weight decay, as `torch.optim.AdamW`; ZO-Bench used torch Adam with decay 0.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        **kwargs: Any,
    ):
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, **kwargs)

    def _update(self, closure: Callable[[], torch.Tensor], seed: int, projected_grad: float) -> None:
        pairs = list(self.trainable())
        for (group, p), z in zip(pairs, gaussian_directions([p for _, p in pairs], seed), strict=True):
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            grad = z.mul_(projected_grad)
            direction = adam_direction(
                state["exp_avg"], state["exp_avg_sq"], grad, group["betas"], group["eps"], state["step"]
            )
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(direction, alpha=-group["lr"])


def _shift(scale: float) -> Move:
    return lambda group: (1.0, scale)


def _sgd(projected_grad: float) -> Move:
    return lambda group: (1.0 - group["lr"] * group["weight_decay"], -group["lr"] * projected_grad)


def _between(start: Move, end: Move) -> Move:
    """The move from a·θ₀ + b·z to a'·θ₀ + b'·z: θ ← (a'/a)·θ + (b' − a'b/a)·z."""

    def move(group: dict[str, Any]) -> tuple[float, float]:
        (a, b), (a2, b2) = start(group), end(group)
        return a2 / a, b2 - a2 * b / a

    return move
