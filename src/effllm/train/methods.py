"""How training methods plug into the loop: callbacks, found by name.

A callback is any object with some of these methods; the trainer calls those it has:

- `on_step_begin(step)`: before optimizer step `step` (0-based: the number of steps already taken).
  Layer sampling (LISA, OwLore) freezes and unfreezes blocks here.
- `on_step_end(step, metrics)`: after step `step` (1-based, as in metrics.jsonl); may add to `metrics`.
- `on_save(step, folder)`: after checkpoint `folder` was written (rank 0).
- `state_dict()` / `load_state_dict(state)`: saved in each checkpoint (per process) and restored on resume.
- `final_model(model)`: the model the run writes at the end, made from the trained one (pruning-aware
  training returns a smaller model here).
- `save_final(model, folder)`: writes the run's result itself instead of the whole model (LoRA writes its
  adapter).

A method registers a factory, `register_method(name, factory)`, and is then chosen with
`effllm train --method NAME --method-options k=v ...`. The factory is called once the trainer is set up
as `factory(trainer, **options)` (model, optimizer, data and config are its attributes) and returns a
callback or a list of them. A method that changes the objective instead passes `loss_fn` to `Trainer`.
Registered here: `lisa` and `owlore` (layer sampling; options as `LayerSampler.lisa` / `.owlore` take),
`early-exit` (LayerSkip's layer dropout and early-exit loss; options in `effllm.train.early_exit`),
`keep-sparsity` (fine-tuning a pruned model keeps its zeros), `pruning-aware` (the model shrinks to
`--target-params` while it trains; options in `effllm.train.pruning_aware`), `lora` / `qlora` (an
adapter on a frozen, for qlora quantized, base; `--lora-*` flags, `effllm.train.lora`), `salt`
(distillation from a smaller model at first; `--teacher`, `--kd-*` flags, `effllm.train.kd`),
`soft-prompt` (prompt vectors learned for a frozen model; `--soft-prompt-tokens`, `effllm.train.soft_prompt`)
`uld` (ULD's unlearning assistant; `--forget`, `--retain`, `--uld-*` flags, `effllm.train.unlearn`) and
`dkm` (DKM weight clustering, a palettized model at the end; `--dkm-*` flags, `effllm.train.dkm`).
A method may also
register `prepare_model(model, config)`, run before the optimizer is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effllm.core.errors import ConfigError

MethodFactory = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    factory: MethodFactory
    # The method sets requires_grad during training: DDP must then allow parameters without gradients.
    freezes_parameters: bool = False
    # Changes the model before the optimizer is built (adapters, a quantized base): (model, config) -> model.
    prepare_model: Callable[[Any, Any], Any] | None = None


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    factory: MethodFactory,
    freezes_parameters: bool = False,
    prepare_model: Callable[[Any, Any], Any] | None = None,
) -> None:
    """Make `factory` available as `--method name`."""
    METHODS[name] = Method(factory, freezes_parameters, prepare_model)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(name: str, trainer: Any, options: dict[str, Any]) -> list[Any]:
    """The callbacks of method `name`; ConfigError for an unknown method or option."""
    try:
        made = get_method(name).factory(trainer, **options)
    except TypeError as e:
        raise ConfigError(f"--method {name}: {e}; check --method-options") from None
    return list(made) if isinstance(made, (list, tuple)) else [made]


class _SamplerCallback:
    """A `LayerSampler` stepped with the trainer's optimizer, whose state it frees for frozen blocks."""

    def __init__(self, sampler: Any, trainer: Any):
        self.sampler, self.trainer = sampler, trainer

    def on_step_begin(self, step: int) -> None:
        self.sampler.on_step_begin(step, self.trainer.optimizer)


def _layer_sampling(kind: str) -> MethodFactory:
    def factory(trainer: Any, **options: Any) -> _SamplerCallback:
        from effllm.train.distributed import unwrap
        from effllm.train.layer_sampling import LayerSampler

        options.setdefault("seed", trainer.config.seed)
        return _SamplerCallback(getattr(LayerSampler, kind)(unwrap(trainer.model), **options), trainer)

    return factory


register_method("lisa", _layer_sampling("lisa"), freezes_parameters=True)
register_method("owlore", _layer_sampling("owlore"), freezes_parameters=True)


def _early_exit(trainer: Any, **options: Any) -> Any:
    from effllm.train.early_exit import EarlyExitTraining

    return EarlyExitTraining(trainer, **options)


register_method("early-exit", _early_exit)


class KeepSparsity:
    """`--method keep-sparsity`: fine-tune a pruned model (`effllm compress prune`) without losing its zeros.

    The mask is the zero pattern of every decoder linear at the start (exact zeros survive saving, and a
    trained weight is never exactly zero by chance), re-applied after every optimizer step; a resumed run
    reads it back from the checkpoint's weights."""

    def __init__(self, trainer: Any):
        from effllm.train.distributed import unwrap

        model = unwrap(trainer.model)
        self.masks = [
            (p, p.detach() == 0)
            for n, p in model.named_parameters()
            if ".layers." in n and p.dim() == 2 and bool((p.detach() == 0).any())
        ]
        if not self.masks:
            raise ConfigError("--method keep-sparsity found no zero weights; prune the model first")
        hook = getattr(trainer.optimizer, "register_step_post_hook", None)
        if hook is not None:  # right after each update, so evaluations see the masked weights too
            hook(lambda *_: self.apply())

    def apply(self) -> None:
        import torch

        with torch.no_grad():
            for p, mask in self.masks:
                p.masked_fill_(mask, 0)

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self.apply()  # for optimizers that update outside step() (layer-wise updates)


register_method("keep-sparsity", KeepSparsity)


def _pruning_aware(trainer: Any, **options: Any) -> Any:
    from effllm.train.pruning_aware import PruningAwareTraining

    return PruningAwareTraining(trainer, **options)


register_method("pruning-aware", _pruning_aware)


def _prepare_lora(model: Any, config: Any) -> Any:
    from effllm.train.lora import prepare_lora

    return prepare_lora(model, config)


def _lora(trainer: Any) -> Any:
    from effllm.train.lora import LoRATraining

    return LoRATraining(trainer)


def _salt(trainer: Any, **options: Any) -> Any:
    from effllm.train.kd import SALTTraining

    return SALTTraining(trainer, **options)


register_method("salt", _salt)


def _prepare_soft_prompt(model: Any, config: Any) -> Any:
    from effllm.train.soft_prompt import prepare_soft_prompt

    return prepare_soft_prompt(model, config)


def _soft_prompt(trainer: Any) -> Any:
    from effllm.train.soft_prompt import SoftPromptTraining

    return SoftPromptTraining(trainer)


def _prepare_uld(model: Any, config: Any) -> Any:
    from effllm.train.unlearn import prepare_uld

    return prepare_uld(model, config)


def _uld(trainer: Any) -> Any:
    from effllm.train.unlearn import ULDTraining

    return ULDTraining(trainer)


def _prepare_dkm(model: Any, config: Any) -> Any:
    from effllm.train.dkm import prepare_dkm

    return prepare_dkm(model, config)


def _dkm(trainer: Any) -> Any:
    from effllm.train.dkm import DKMTraining

    return DKMTraining(trainer)


register_method("dkm", _dkm, prepare_model=_prepare_dkm)
register_method("uld", _uld, freezes_parameters=True, prepare_model=_prepare_uld)
register_method("soft-prompt", _soft_prompt, freezes_parameters=True, prepare_model=_prepare_soft_prompt)
register_method("lora", _lora, freezes_parameters=True, prepare_model=_prepare_lora)
register_method("qlora", _lora, freezes_parameters=True, prepare_model=_prepare_lora)


def call_hook(callbacks: list[Any], hook: str, *args: Any) -> None:
    for callback in callbacks:
        fn = getattr(callback, hook, None)
        if fn is not None:
            fn(*args)
