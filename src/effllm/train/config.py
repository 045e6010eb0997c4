"""`TrainConfig`: every option of a training run, one field per `effllm train` flag.

A YAML file (`--config`) uses the same names, with dashes or underscores; flags given on the command line
win over the file, the file over the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from effllm.core.errors import ConfigError
from effllm.core.flags import numbers_in, option, parse_key_values
from effllm.optim.registry import list_optimizers

PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "constant")
SAVE_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Options of one training run (pretraining or fine-tuning)."""

    # ---------------------------------------------------------------- model
    model: str | None = option(
        None, "checkpoint folder or hub id to start from (default: the embedded default model)"
    )
    model_config: str | None = option(
        None, "config.json of a new model trained from scratch (needs --tokenizer)"
    )
    tokenizer: str | None = option(None, "tokenizer folder (default: the --model's own)")
    # ---------------------------------------------------------------- data
    data: list[str] = option(
        [],
        "training data: text files, folders, jsonl with a text field, chat jsonl (messages)",
        metavar="PATH",
    )
    eval_data: list[str] = option([], "held-out data (default: --eval-fraction of --data)", metavar="PATH")
    eval_fraction: float = option(
        0.01, "fraction of the packed sequences held out for evaluation when no --eval-data"
    )
    text_field: str = option("text", "the field of a jsonl record that holds its text")
    cache_dir: str | None = option(None, "where tokenized shards are cached (default OUT/cache)")
    out: str | None = option(None, "run folder: checkpoints, metrics, and the final model")
    # ---------------------------------------------------------------- length of the run and batch
    steps: int = option(1000, "optimizer steps")
    seq_len: int = option(512, "tokens per packed training sequence")
    batch_size: int = option(8, "sequences per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    # ---------------------------------------------------------------- optimizer and schedule
    optimizer: str = option(
        "adamw",
        f"optimizer, one of {', '.join(list_optimizers())} (effllm.optim.list_optimizers describes each)",
    )
    optimizer_options: dict[str, Any] = option(
        {}, "optimizer options as KEY=VALUE (e.g. betas=[0.9,0.95] rank=128)"
    )
    lr: float = option(3e-4, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay (not applied to norms and biases)")
    warmup_steps: int = option(0, "linear warmup steps")
    schedule: str = option("cosine", "learning-rate decay after warmup", SCHEDULES)
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    # ---------------------------------------------------------------- numerics and memory
    precision: str = option("fp32", "fp32, or bf16 autocast over fp32 weights", PRECISIONS)
    activation_checkpointing: bool = option(False, "recompute decoder layers in the backward pass")
    dropout: float = option(
        0.0, "dropout on the embeddings and each residual branch while training (0 = off)"
    )
    device: str | None = option(
        None, "cpu, cuda or cuda:N (default: CUDA when available; torchrun: the local rank's GPU)"
    )
    parallel: str = option("ddp", "how torchrun processes share the model", PARALLEL)
    # ---------------------------------------------------------------- evaluation, checkpoints, output
    eval_every: int = option(0, "evaluate held-out perplexity every N steps (0 = only at the end)")
    eval_batches: int = option(0, "most held-out micro-batches per evaluation (0 = all)")
    save_every: int = option(0, "save a resumable checkpoint every N steps (0 = only the final model)")
    keep_last: int = option(2, "checkpoints kept; older ones are deleted")
    resume: bool = option(
        False, "continue the run in --out from its latest checkpoint (fresh start when it has none)"
    )
    seed: int = option(0, "seed of the initial weights, the data order and every random choice")
    log_every: int = option(10, "print a progress line every N steps when stderr is not a terminal")
    peak_tflops: float | None = option(
        None, "peak TFLOP/s per process for model FLOPs utilisation (default: detected)"
    )
    save_dtype: str = option(
        "float32",
        "dtype of the final model (checkpoints for --resume always keep float32); bfloat16 halves its size",
        SAVE_DTYPES,
    )
    tensorboard: bool = option(True, "also log to TensorBoard under OUT/tensorboard when it is installed")
    # ---------------------------------------------------------------- training methods
    method: str | None = option(
        None,
        "training method plugged into the loop: lisa, owlore, early-exit, keep-sparsity, pruning-aware, lora, "
        "qlora, salt, soft-prompt, uld, dkm (effllm.train.methods; docs/training-methods.md)",
    )
    method_options: dict[str, Any] = option({}, "the method's options as KEY=VALUE")
    target_params: int | None = option(
        None, "--method pruning-aware: the final model's parameter count (e.g. 9.05e6)"
    )
    lora_rank: int = option(16, "--method lora/qlora: the adapters' rank r")
    lora_alpha: float = option(32.0, "--method lora/qlora: the scale's numerator (scale alpha / r)")
    lora_targets: list[str] = option(
        ["q_proj", "v_proj"],
        "--method lora/qlora: projections that get adapters (q_proj ... down_proj, or all-linear)",
        metavar="NAME",
    )
    lora_dropout: float = option(0.0, "--method lora/qlora: dropout on the adapters' input")
    lora_rslora: bool = option(
        False, "--method lora/qlora: scale alpha / sqrt(r) (rsLoRA) instead of alpha / r"
    )
    lora_base_scheme: str | None = option(
        None, "--method qlora: how the frozen base is quantized: w4a16 (default, groups of 32) or w8a16"
    )
    soft_prompt_tokens: int = option(20, "--method soft-prompt: how many prompt vectors are learned")
    forget: list[str] = option(
        [], "--method uld: what to forget (the assistant's training data; same as --data)", metavar="PATH"
    )
    retain: list[str] = option(
        [], "--method uld: what to keep (the assistant is made flat on it)", metavar="PATH"
    )
    uld_layers: int | None = option(
        None, "--method uld: decoder layers of the assistant, the model's first (default a quarter)"
    )
    uld_retain_weight: float = option(5.0, "--method uld: weight of the retain set's KL-to-uniform term")
    dkm_bits: int = option(3, "--method dkm: palette size 2^bits per weight matrix")
    dkm_tau: float = option(1e-4, "--method dkm: softmax temperature of the soft assignment (coremltools')")
    dkm_iters: int = option(3, "--method dkm: differentiable k-means iterations per forward")
    dkm_edkm: bool = option(
        False,
        "--method dkm: eDKM's memory saving: cluster the weights' bfloat16 values and store the maps saved "
        "for the backward once per distinct value (on the CPU while training on an accelerator)",
    )
    teacher: str | None = option(
        None, "SALT (--method salt, implied): a smaller model of the same tokenizer to distil from at first"
    )
    kd_weight: float = option(0.5, "SALT: the distillation term's weight w in (1 - w) CE + w KD")
    kd_temperature: float = option(1.0, "SALT: the softmax temperature of the distillation term")
    kd_until_step: int | None = option(
        None, "SALT: optimizer steps trained with distillation; plain cross-entropy after (required)"
    )
    kd_select: float | None = option(
        None, "SALT_DS: distil on this fraction of candidate sequences, chosen by the teacher's loss"
    )

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "options") -> TrainConfig:
        """Build from a mapping whose keys are field names, with dashes or underscores."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = [n for n in known if n.startswith(name[:4])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{source}: unknown option {key!r}{hint}")
            kwargs[name] = _coerce(name, value, _field_type(cls, name), source)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The YAML file's options, with `overrides` (e.g. flags given on the command line) on top."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}; pass an existing YAML file to --config") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of option names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if str(key).replace("-", "_") not in known:
                raise ConfigError(
                    f"{path}: unknown option {key!r}; the options are the flags of `effllm train`"
                )
        merged = {str(k).replace("-", "_"): v for k, v in raw.items()}
        for key, value in (overrides or {}).items():
            key = key.replace("-", "_")
            both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both_dicts else value  # flags add to the file's options
        return cls.from_dict(merged, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values (tuples in options become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ checks that need no files
    def validate(self) -> None:
        """Raise ConfigError on options that cannot make a run (files are checked when they are opened)."""
        if self.model and self.model_config:
            raise ConfigError(
                "pass one of --model (a checkpoint to start from) or --model-config (a new model), not both"
            )
        if self.model_config and not self.tokenizer:
            raise ConfigError("--model-config needs --tokenizer (make one with `effllm tokenizer train`)")
        if self.forget:
            if self.data and self.data != self.forget:
                raise ConfigError("--forget is the run's training data: pass it or --data, not both")
            self.data = list(self.forget)
        if (self.forget or self.retain) and self.method != "uld":
            raise ConfigError("--forget and --retain belong to --method uld; add that method")
        if self.method == "uld" and not self.retain:
            raise ConfigError("--method uld needs the data to keep: pass --retain PATH")
        if not self.data:
            raise ConfigError("pass training data with --data (text files, folders or jsonl)")
        if not self.out:
            raise ConfigError("pass the run folder with --out")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("--clip-grad and --weight-decay must not be negative")
        if self.target_params is not None and self.method != "pruning-aware":
            raise ConfigError(
                "--target-params sets the size --method pruning-aware prunes to; add that method"
            )
        if self.lora_base_scheme is not None and self.method != "qlora":
            raise ConfigError("--lora-base-scheme sets the base of --method qlora; add that method")
        self._validate_salt()
        if self.soft_prompt_tokens < 1:
            raise ConfigError(f"--soft-prompt-tokens must be at least 1, got {self.soft_prompt_tokens}")
        if self.method in ("lora", "qlora", "uld"):
            from effllm.train.lora import lora_config

            lora_config(self)  # ConfigError for a bad rank, dropout or target now
        if self.target_params is not None and self.target_params < 1:
            raise ConfigError(f"--target-params must be positive, got {self.target_params}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, f.name)!r}"
                )

    def _validate_salt(self) -> None:
        if self.teacher and self.method is None:
            self.method = "salt"  # --teacher alone means SALT
        salt_flags = [
            f"--{name.replace('_', '-')}"
            for name in ("teacher", "kd_until_step", "kd_select")
            if getattr(self, name) is not None
        ]
        if self.method != "salt":
            if salt_flags:
                raise ConfigError(
                    f"{', '.join(salt_flags)} belong to SALT distillation, which does not combine with "
                    f"--method {self.method}; drop them or the method"
                )
            return
        if not self.teacher:
            raise ConfigError("--method salt distils from a smaller model: pass it with --teacher PATH")
        if self.kd_until_step is None or not 1 <= self.kd_until_step <= self.steps:
            raise ConfigError(
                f"SALT needs --kd-until-step N with 1 <= N <= --steps ({self.steps}): the steps trained "
                f"with distillation; got {self.kd_until_step}"
            )
        if not 0 <= self.kd_weight <= 1 or self.kd_temperature <= 0:
            raise ConfigError(
                f"--kd-weight must be in [0, 1] and --kd-temperature positive; got {self.kd_weight}, "
                f"{self.kd_temperature}"
            )
        if self.kd_select is not None and not 0 < self.kd_select <= 1:
            raise ConfigError(
                f"--kd-select is a fraction of the candidate sequences in (0, 1], got {self.kd_select}"
            )


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check (and gently convert) a value against the field's type: YAML reads '3e-4' as a string."""
    flag = f"{name.replace('_', '-')}"
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [str(v) for v in values]
        if origin is dict:
            if isinstance(value, list):
                return parse_key_values([str(v) for v in value], f"--{flag}")
            if not isinstance(value, dict):
                raise ValueError
            return {str(k).replace("-", "_"): numbers_in(v) for k, v in value.items()}
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: {flag} cannot be {value!r}; it takes {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list of paths"
    if origin is dict:
        return "a mapping of KEY: VALUE"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
