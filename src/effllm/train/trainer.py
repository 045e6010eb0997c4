"""The training loop: `Trainer(config).train()`.

Setup composes the parts (tokenizer, model, DDP/FSDP2 wrapping, optimizer, schedule, data, methods) and
checks every input before the first step; the loop then runs `train_step` once per optimizer step,
logging, evaluating and checkpointing on schedule. Everything a process does is a function of the
config, the seed and the step, which is what makes `--resume` continue exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from effllm.core.errors import CheckpointError, ConfigError
from effllm.models.checkpoint import load_config, load_model, weight_files
from effllm.models.config import ModelConfig
from effllm.models.default import default_model_path
from effllm.models.hub import resolve_model_path
from effllm.models.safetensors_io import iter_tensors
from effllm.models.tokenizer import load_tokenizer
from effllm.models.transformer import CausalLM
from effllm.optim import build_optimizer, optimizer_options, requires_backward, steps_in_backward
from effllm.train.checkpointing import (
    load_training_state,
    remove_partial_checkpoints,
    resume_point,
    save_checkpoint,
    save_full_model,
)
from effllm.train.config import TrainConfig
from effllm.train.data import TrainData, prepare_data
from effllm.train.distributed import (
    Distributed,
    gradient_sync,
    init_distributed,
    unwrap,
    wrap_model,
)
from effllm.train.loss import LossFn, causal_lm_loss, count_targets
from effllm.train.methods import build_method, call_hook, get_method
from effllm.train.metrics import (
    MetricsLogger,
    detect_peak_tflops,
    flops_per_token,
    plot_loss_curve,
    truncate_metrics,
)
from effllm.train.progress import Progress
from effllm.train.schedule import build_scheduler

# The options a resumed run may change: how long it runs, how often it saves, logs and evaluates, where
# it runs. Any other change (model, tokenizer, data, sequence length, optimizer and its options, schedule,
# precision, method ...) would make it a different run, so --resume refuses it.
RESUMABLE_CHANGES = (
    "steps",
    "save_every",
    "keep_last",
    "log_every",
    "eval_every",
    "eval_batches",
    "tensorboard",
    "save_dtype",
    "peak_tflops",
    "resume",
    "out",
    "cache_dir",
    "device",
    "parallel",
)


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the global batch
    grad_norm: float | None  # before clipping; None without gradients
    targets: int  # target tokens in the global batch


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: LossFn = causal_lm_loss,
    env: Distributed | None = None,
    precision: str = "fp32",
    clip_grad: float = 0.0,
) -> StepResult:
    """One optimizer step over this process's micro-batches of the global batch.

    Each micro-batch's summed loss is divided by the target count of the whole global batch (all
    micro-batches, all processes) and multiplied by the world size (DDP and FSDP average gradients), so
    the gradient is that of the mean loss over one big batch, however it is split.
    """
    env = env or Distributed(0, 1, 0, next(model.parameters()).device)
    local = torch.tensor(float(sum(count_targets(mb) for mb in micro_batches)), device=env.device)
    targets = int(env.all_reduce_sum(local).item())
    denom = max(targets, 1)

    def autocast() -> Any:
        return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    if not requires_backward(optimizer):
        last: list[torch.Tensor] = []

        def closure(params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            # Zeroth-order optimizers call closure(); forward-gradient ones pass the parameters to substitute.
            net = model if params is None else _substituted(unwrap(model), params)
            with torch.no_grad() if params is None else contextlib.nullcontext(), autocast():
                total = sum(loss_fn(net, mb).float() for mb in micro_batches)
            last.append((env.all_reduce_sum(total) if params is None else total) / denom)
            return last[-1]

        returned = optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float(returned if returned is not None else last[-1]), None, targets)

    total = torch.zeros((), device=env.device)
    for i, mb in enumerate(micro_batches):
        with gradient_sync(model, sync=i == len(micro_batches) - 1):
            with autocast():
                loss_sum = loss_fn(model, mb)
            (loss_sum * (env.world_size / denom)).backward()
        total += loss_sum.detach().float()
    loss = float(env.all_reduce_sum(total).item()) / denom
    grad_norm = clip_gradients(model, clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, targets)


def _substituted(model: nn.Module, params: dict[str, torch.Tensor]) -> Any:
    """`model` called with `params` in place of its own (torch.func.functional_call)."""
    return lambda *args: torch.func.functional_call(model, params, args)


def clip_gradients(model: nn.Module, max_norm: float) -> float | None:
    """The global gradient norm, after clipping to `max_norm` when it is positive."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


class Trainer:
    """Trains `config.model` (or a new `config.model_config` model) on `config.data` into `config.out`.

    `callbacks` and `loss_fn` are where training methods plug in (see `effllm.train.methods` and
    `effllm.train.loss`); `--method` adds registered callbacks by name.
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Any] = (), loss_fn: LossFn = causal_lm_loss):
        config.validate()
        self.config = config
        self.callbacks = list(callbacks)
        self.loss_fn = loss_fn
        self.eval_loss_fn: LossFn = causal_lm_loss  # the held-out loss (a method may replace it)
        self.out = Path(config.out)
        self.step = 0  # optimizer steps taken
        self.samples_seen = 0  # training sequences consumed: the data position
        self.tokens_seen = 0
        self.env: Distributed | None = None
        self.model: nn.Module | None = None
        self.metrics: MetricsLogger | None = None
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything and check every input; raises EffLLMError before any training."""
        cfg = self.config
        if not cfg.model and not cfg.model_config:
            cfg.model = str(default_model_path())
        self.env = env = init_distributed(cfg.device)
        checkpoint = self._check_out()
        env.barrier()  # every process has checked --out before anyone writes to it
        _seed_everything(cfg.seed)
        self.tokenizer_folder = resolve_model_path(cfg.tokenizer or cfg.model)
        self.tokenizer = load_tokenizer(self.tokenizer_folder)
        self.model_config = self._model_config()
        optimizer_options(
            cfg.optimizer
        )  # an unknown name fails now, listing the names, before any model is built

        method = get_method(cfg.method) if cfg.method else None
        prepare = method.prepare_model if method is not None else None
        # A method that changes the model (adapters, a quantized base) rebuilds it from the base; a
        # checkpoint's weights, which hold those changes, are loaded into it after.
        model = self._build_model(None if prepare else checkpoint)
        if prepare is not None:
            model = prepare(model, cfg)
            if checkpoint is not None and cfg.parallel != "fsdp":
                _load_weights(model, checkpoint)
        self.model = wrap_model(model, cfg.parallel, env, method is not None and method.freezes_parameters)
        options = dict(cfg.optimizer_options)
        if options.get(
            "layerwise"
        ):  # layer-wise updates step inside backward, so they count the accumulation
            options.setdefault("accumulation_steps", cfg.grad_accum)
        self.optimizer = build_optimizer(
            cfg.optimizer, unwrap(self.model), cfg.lr, cfg.weight_decay, **options
        )
        if env.enabled and getattr(self.optimizer, "closure_takes_params", False):
            raise ConfigError(
                f"--optimizer {cfg.optimizer} (forward gradients) runs on one process only; "
                "run it without torchrun"
            )
        if cfg.dropout and not requires_backward(self.optimizer):
            raise ConfigError(
                f"--optimizer {cfg.optimizer} compares losses of the same batch, which dropout "
                "would make random; use --dropout 0"
            )
        if env.enabled and steps_in_backward(self.optimizer):
            raise ConfigError(
                "layer-wise updates step before gradients are reduced across processes; "
                "run them without torchrun"
            )
        self.scheduler = build_scheduler(
            self.optimizer, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio
        )
        self.data: TrainData = prepare_data(
            cfg,
            self.tokenizer,
            self.tokenizer_folder,
            build=env.is_local_main,
            sync=env.first_error,
            log=self._print,
        )
        if cfg.method:
            self.callbacks += build_method(cfg.method, self, cfg.method_options)
        if checkpoint is not None:
            self._restore(checkpoint)
        self._open_outputs()

    def _check_out(self) -> Path | None:
        """The checkpoint to resume from; ConfigError when --out holds something we must not overwrite."""
        out, cfg = self.out, self.config
        for path in (out, *out.parents):
            if path.exists() and not path.is_dir():
                raise ConfigError(f"--out {out}: {path} is a file; pass a folder for the run")
        # A run that stopped while tokenizing leaves only its cache, which the next run reuses.
        occupied = out.is_dir() and any(p.name != "cache" for p in out.iterdir())
        is_run = (out / "train_config.yaml").exists()
        if occupied and not cfg.resume:
            what = "a training run" if is_run else "files"
            raise ConfigError(
                f"--out {out} already holds {what}; pass --resume to continue it or choose a new folder"
            )
        if occupied and not is_run:
            raise ConfigError(f"--out {out} holds files but no training run to resume; choose a new folder")
        if not cfg.resume:
            return None
        found = resume_point(out, self._print)
        if found is None:
            return None
        folder, state = found
        self._check_same_run(folder, state.get("config", {}))
        return folder

    def _check_same_run(self, folder: Path, saved: dict[str, Any]) -> None:
        """Refuse a resume whose options change what the run is, naming each changed field."""
        now = self.config.to_dict()
        changed = [k for k in now if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
        if changed:
            diffs = "; ".join(f"--{k.replace('_', '-')} was {saved[k]!r}, now {now[k]!r}" for k in changed)
            raise ConfigError(
                f"{folder} belongs to a different run: {diffs}. Resume with the run's own options (only "
                f"{', '.join(RESUMABLE_CHANGES[:5])} ... may change) or train into a new --out"
            )

    def _model_config(self) -> ModelConfig:
        cfg = self.config
        config = load_config(cfg.model) if cfg.model else ModelConfig.from_json_file(cfg.model_config)
        if cfg.seq_len > config.max_position_embeddings:
            raise ConfigError(
                f"--seq-len {cfg.seq_len} exceeds the model's maximum sequence length "
                f"(max_position_embeddings {config.max_position_embeddings}); lower --seq-len"
            )
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{config.vocab_size}; use the model's own tokenizer or a larger vocab_size"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, name) is None:
                setattr(config, name, getattr(self.tokenizer, name))
        return config

    def _build_model(self, checkpoint: Path | None) -> CausalLM:
        cfg, device = self.config, self.env.device
        if checkpoint is not None and cfg.parallel != "fsdp":
            model = load_model(checkpoint, dtype=torch.float32, device=device)
        elif cfg.model:
            model = load_model(cfg.model, dtype=torch.float32, device=device)
            model.config = self.model_config
        else:
            model = CausalLM(self.model_config).to(device)
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        model.set_dropout(cfg.dropout)
        return model.train()

    def _restore(self, folder: Path) -> None:
        trainer_state, rank_state = load_training_state(
            folder, self.model, self.optimizer, self.scheduler, self.env
        )
        self.step = trainer_state["step"]
        self.samples_seen = trainer_state["samples_seen"]
        self.tokens_seen = trainer_state["tokens_seen"]
        for callback, state in zip(self.callbacks, rank_state.get("callbacks", []), strict=False):
            if state is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(state)
        self.resumed_from = folder
        self._print(f"resuming from {folder} (step {self.step})")

    def _open_outputs(self) -> None:
        if not self.env.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(self.out)
        tmp = self.out / ".train_config.yaml.tmp"
        tmp.write_text(self.config.to_yaml())
        os.replace(tmp, self.out / "train_config.yaml")
        metrics_path = self.out / "metrics.jsonl"
        truncate_metrics(metrics_path, self.step)
        tensorboard = self.out / "tensorboard" if self.config.tensorboard else None
        self.metrics = MetricsLogger(metrics_path, tensorboard)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run to `config.steps`; write the final model to `config.out`. Returns the last metrics row."""
        if self.model is None:
            self.setup()
        cfg, env = self.config, self.env
        peak = cfg.peak_tflops or detect_peak_tflops(env.device, cfg.precision)
        progress = Progress(cfg.steps, self.step, cfg.log_every, enabled=env.is_main)
        has_held_out = len(self.data.held_out_indices) > 0
        row: dict[str, Any] = {}
        saver = next((c for c in self.callbacks if hasattr(c, "save_final")), None)
        try:
            while self.step < cfg.steps:
                row = self._step(peak)
                last = self.step == cfg.steps
                if has_held_out and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    row.update(self.evaluate())
                call_hook(self.callbacks, "on_step_end", self.step, row)
                if self.metrics is not None:
                    self.metrics.log(row)
                progress.update(row)
                if cfg.save_every and (self.step % cfg.save_every == 0 or last):
                    self.save_checkpoint(progress)
            if saver is not None:
                if env.is_main:
                    saver.save_final(unwrap(self.model), self.out)
            else:
                dtype = getattr(torch, cfg.save_dtype)
                save_full_model(self._final_model(), self.out, env, self.tokenizer, dtype)
            env.barrier()
        finally:
            progress.close()
            if self.metrics is not None:
                self.metrics.close()
        if env.is_main:
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")
            if saver is None:
                self._print(f"wrote the model to {self.out}")
        return row

    def _final_model(self) -> nn.Module:
        """The model to write at the end: the trained one, or what a method's `final_model` makes of it."""
        model = self.model
        for callback in self.callbacks:
            if hasattr(callback, "final_model"):
                model = callback.final_model(unwrap(model))
        return model

    def _step(self, peak_tflops: float | None) -> dict[str, Any]:
        """One optimizer step; its metrics row."""
        cfg, env = self.config, self.env
        global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
        tokens = global_batch * cfg.seq_len
        call_hook(self.callbacks, "on_step_begin", self.step)
        lr = self.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        result = train_step(
            self.model, self.optimizer, self._micro_batches(), self.loss_fn, env, cfg.precision, cfg.clip_grad
        )
        self.scheduler.step()
        seconds = time.perf_counter() - start
        self.step += 1
        self.samples_seen += global_batch
        self.tokens_seen += tokens
        row = {
            "step": self.step,
            "loss": result.loss,
            "lr": lr,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens / seconds,
            "step_time_s": seconds,
        }
        if result.grad_norm is not None:
            row["grad_norm"] = result.grad_norm
        if peak_tflops:
            flops = flops_per_token(self.model_config, cfg.seq_len) * tokens
            row["mfu"] = flops / seconds / (peak_tflops * 1e12 * env.world_size)
        return row

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the next global batch (sequence order: micro, rank, row)."""
        cfg, env = self.config, self.env
        batches = []
        for m in range(cfg.grad_accum):
            first = self.samples_seen + (m * env.world_size + env.rank) * cfg.batch_size
            batch = self.data.micro_batch(first, cfg.batch_size)
            batches.append({k: v.to(env.device, non_blocking=True) for k, v in batch.items()})
        return batches

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out mean loss per target token and perplexity, over all processes."""
        cfg, env = self.config, self.env
        self.model.eval()
        totals = torch.zeros(2, device=env.device, dtype=torch.float64)  # [loss sum, targets]
        for batch in self.data.held_out_batches(cfg.batch_size, env.rank, env.world_size, cfg.eval_batches):
            batch = {k: v.to(env.device) for k, v in batch.items()}
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                totals[0] += self.eval_loss_fn(self.model, batch).double()
            totals[1] += count_targets(batch)
        self.model.train()
        env.all_reduce_sum(totals)
        loss = float(totals[0] / totals[1].clamp(min=1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save_checkpoint(self, progress: Progress | None = None) -> Path:
        """Write a resumable checkpoint of the current step (every process must call it)."""
        say = progress.write if progress is not None else self._print
        say(f"checkpoint: saving step {self.step}")
        trainer_state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "world_size": self.env.world_size,
            "config": self.config.to_dict(),
        }
        rank_state = {
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks]
        }
        folder = save_checkpoint(
            self.out,
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            trainer_state,
            rank_state,
            self.env,
            self.tokenizer,
            self.config.keep_last,
        )
        if self.env.is_main:
            call_hook(self.callbacks, "on_save", self.step, folder)
        say(f"checkpoint: saved {folder}")
        return folder

    def _print(self, message: str) -> None:
        if self.env is None or self.env.is_main:
            print(message, flush=True)


def _load_weights(model: nn.Module, folder: Path) -> None:
    """Every tensor of checkpoint `folder` into `model`, which must have exactly those (a tied head aside)."""
    state = {name: t for f in weight_files(folder) for name, t in iter_tensors(f, dtype=torch.float32)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match this run's model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "resume it with the options it was started with"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    config: TrainConfig, callbacks: Sequence[Any] = (), loss_fn: LossFn = causal_lm_loss
) -> dict[str, Any]:
    """Run `config` to the end (see `Trainer`); returns the last metrics row."""
    return Trainer(config, callbacks, loss_fn).train()
