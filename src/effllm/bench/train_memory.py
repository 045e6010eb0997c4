"""`effllm bench train-memory`: what each memory-efficient training method saves, side by side in one run.

For each model shape (default: the GaLore paper's 60M and 350M llamas) and each method (AdamW, GaLore at
rank 128 and 256, 8-bit GaLore, layer-wise GaLore in 32 and 8 bits, LISA, OwLore, ZO-SGD, ZO-Adam, and a
forward-only `inference` row as the floor) one fresh process builds the model with random weights, trains
it on random tokens with the trainer's own `train_step`, and reports:

- `weights_bytes`: the parameters;
- `gradient_peak_bytes`: the most gradient memory alive at once, measured by a hook on every parameter's
  gradient accumulation (all gradients for a standard step; one parameter's for layer-wise updates; none
  for zeroth-order methods);
- `optimizer_state_bytes`: every tensor the optimizer holds (moments, projectors, 8-bit codes and scales),
  the most over the run (LISA and OwLore release the state of blocks that freeze);
- `model_state_bytes`: the sum of those three (what the method changes; activations excluded);
- `peak_bytes` / `added_bytes`: the process's resident high-water mark (CUDA: the allocator's peak), and
  that peak less what the process held before the model was built (the Python and torch runtime);
- `step_time_s`: the median step; for GaLore methods also `refresh_step_time_s` (a step that recomputes the
  projectors by SVD, measured after warm-up) and `step_time_over_gap_s`, the mean over one
  `update_proj_gap` of the method: (refresh + (gap - 1) x median) / gap.

One process per row, so one method's freed memory never hides in the next one's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effllm.bench.shapes import SHAPES, shape_config
from effllm.bench.train import peak_memory_bytes, reset_peak_memory
from effllm.core.errors import ConfigError, EffLLMError
from effllm.models.transformer import CausalLM

# The GaLore paper's rank per pre-training shape (Table 2: 60M r=128, 130M-350M r=256).
PAPER_RANK = {"galore-60m": 128, "galore-350m": 256}
DEFAULT_RANK = 128
# Blocks that train at once under LISA and OwLore, and how often they are redrawn.
SAMPLED_LAYERS = 2
LISA_INTERVAL = 20


@dataclass(frozen=True)
class MethodSpec:
    """How to train with one method: the optimizer by name and its options, optionally layer sampling."""

    description: str
    optimizer: str | None  # None: forward passes only (the inference floor)
    options: Callable[[int], dict[str, Any]] = field(default=lambda rank: {})  # rank -> optimizer options
    sampler: str | None = None  # "lisa" or "owlore"


def _galore(rank: int | None = None, **extra: Any) -> Callable[[int], dict[str, Any]]:
    return lambda paper_rank: {"rank": rank or paper_rank, **extra}


METHODS: dict[str, MethodSpec] = {
    "inference": MethodSpec("forward passes under no_grad: the memory floor of any training", None),
    "adamw": MethodSpec("AdamW (the baseline)", "adamw"),
    "galore-r128": MethodSpec("GaLore, rank 128", "galore_adamw", _galore(128)),
    "galore-r256": MethodSpec("GaLore, rank 256", "galore_adamw", _galore(256)),
    "galore-8bit": MethodSpec("8-bit GaLore (paper rank)", "galore_adamw8bit", _galore()),
    "galore-layerwise": MethodSpec("layer-wise GaLore (paper rank)", "galore_adamw", _galore(layerwise=True)),
    "galore-8bit-layerwise": MethodSpec(
        "layer-wise 8-bit GaLore (paper rank)", "galore_adamw8bit", _galore(layerwise=True)
    ),
    "lisa": MethodSpec(
        f"LISA: AdamW, {SAMPLED_LAYERS} blocks train, redrawn every {LISA_INTERVAL} steps",
        "adamw",
        sampler="lisa",
    ),
    "owlore": MethodSpec(
        f"OwLore: GaLore (OwLore's rank 256, gap 100) on {SAMPLED_LAYERS} sampled blocks",
        "galore_adamw",
        sampler="owlore",
    ),
    "zo-sgd": MethodSpec("MeZO ZO-SGD (two forward passes, no backward)", "zo_sgd"),
    "zo-adam": MethodSpec("ZO-Adam (AdamW moments on the zeroth-order estimate)", "zo_adam"),
}
DEFAULT_SHAPES = ("galore-60m", "galore-350m")


def measure_method(
    shape: str,
    method: str,
    batch_size: int = 2,
    seq_len: int = 256,
    steps: int = 3,
    warmup: int = 1,
    precision: str = "fp32",
    device: str | None = None,
    rank: int | None = None,
    lr: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """One row: train `shape` with `method` for `warmup` + `steps` steps (plus one refresh step for GaLore).

    Run it in a fresh process (as `run_train_memory_bench` does) for a peak that is this method's alone.
    """
    # Everything imported before the baseline, so that module memory is not counted as the method's.
    import effllm.optim  # noqa: F401
    import effllm.train.layer_sampling  # noqa: F401
    from effllm.core.dtypes import parse_device
    from effllm.optim import steps_in_backward
    from effllm.train.distributed import Distributed
    from effllm.train.loss import causal_lm_loss
    from effllm.train.trainer import train_step

    spec = _method(method)
    config = shape_config(shape)
    dev = parse_device(device)
    paper_rank = rank or PAPER_RANK.get(shape, DEFAULT_RANK)
    baseline = reset_peak_memory(dev)
    torch.manual_seed(seed)
    model = CausalLM(config).to(dev).train()
    grads = _GradientTracker(model)
    optimizer, sampler = _build(spec, model, paper_rank, lr, seed)
    gap, rank_used = _group_setting(optimizer, "update_proj_gap"), _group_setting(optimizer, "rank")
    env = Distributed(0, 1, 0, dev)
    generator = torch.Generator().manual_seed(seed)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
        return {"input_ids": ids[:, :-1].to(dev), "labels": ids[:, 1:].to(dev)}

    def one_step(step: int) -> tuple[float, float]:
        b = batch()
        start = time.perf_counter()
        if optimizer is None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = float(causal_lm_loss(model, b)) / b["labels"].numel()
        else:
            if sampler is not None:
                sampler.on_step_begin(step, optimizer)
            loss = train_step(model, optimizer, [b], env=env, precision=precision, clip_grad=1.0).loss
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start, loss

    # With a projector gap, the step right after warm-up + timed steps is made a refresh step (GaLore refreshes
    # at steps 0, T, 2T, ...), so a refresh is timed warm; the reported mean uses the method's own gap.
    measured_gap = warmup + steps
    if gap is not None:
        _set_gap(optimizer, measured_gap)
    state_bytes, times, refresh, loss = 0, [], None, float("nan")
    for step in range(warmup + steps + (1 if gap is not None else 0)):
        grads.enabled = step < max(warmup, 1)  # the hook's bookkeeping stays out of the timed steps
        elapsed, loss = one_step(step)
        state_bytes = max(state_bytes, optimizer_state_bytes(optimizer) if optimizer is not None else 0)
        if step == measured_gap:
            refresh = elapsed
        elif step >= warmup:
            times.append(elapsed)
    peak = peak_memory_bytes(dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    step_time = statistics.median(times)
    layerwise = optimizer is not None and steps_in_backward(optimizer)
    return {
        "shape": shape,
        "method": method,
        "description": spec.description,
        "optimizer": spec.optimizer,
        "rank": rank_used,
        "layerwise": layerwise,
        "params": config.num_parameters(),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "weights_bytes": weights,
        "gradient_peak_bytes": grads.peak,
        "optimizer_state_bytes": state_bytes,
        "model_state_bytes": weights + grads.peak + state_bytes,
        "peak_bytes": peak,
        "added_bytes": None if peak is None else peak - baseline,
        "memory_kind": "cuda max allocated" if dev.type == "cuda" else "process peak RSS (VmHWM)",
        "step_time_s": step_time,
        "tokens_per_s": batch_size * seq_len / step_time,
        "refresh_step_time_s": refresh,
        "update_proj_gap": gap,
        "step_time_over_gap_s": step_time if refresh is None else (refresh + (gap - 1) * step_time) / gap,
        "final_loss": loss,
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor in the optimizer's state (layer-wise updates: their inner optimizers)."""
    seen: set[tuple[int, int]] = set()  # (address, bytes): a tensor referenced twice counts once

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel():
                seen.add((value.data_ptr(), value.numel() * value.element_size()))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for opt in _with_inner(optimizer):
        walk(opt.state)
    return sum(nbytes for _, nbytes in seen)


class _GradientTracker:
    """The most gradient bytes alive at once, checked each time a parameter's gradient is accumulated.

    Its hooks are registered before the optimizer's, so for layer-wise updates they run before the update
    frees the gradient: each check sees the gradient just produced plus any not yet freed.
    """

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak, self.enabled = 0, True
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._check)

    def _check(self, _: torch.Tensor) -> None:
        if self.enabled:
            live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
            self.peak = max(self.peak, live)


def _build(
    spec: MethodSpec, model: nn.Module, rank: int, lr: float, seed: int
) -> tuple[torch.optim.Optimizer | None, Any]:
    """(optimizer, layer sampler or None); (None, None) for the inference row."""
    if spec.optimizer is None:
        model.eval()
        return None, None
    from effllm.optim import build_optimizer

    if spec.sampler is None:
        return build_optimizer(spec.optimizer, model, lr=lr, **spec.options(rank)), None
    from effllm.train.layer_sampling import OWLORE_LOW_RANK, LayerSampler

    # Random weights have no outliers at OWL's threshold, so OwLore's blocks are drawn uniformly here;
    # which blocks train changes neither memory nor time.
    low_rank = OWLORE_LOW_RANK if spec.sampler == "owlore" else None
    interval = OWLORE_LOW_RANK["update_proj_gap"] if low_rank else LISA_INTERVAL
    sampler = LayerSampler(model, SAMPLED_LAYERS, interval, seed=seed, low_rank=low_rank)
    return build_optimizer(spec.optimizer, sampler.param_groups(), lr=lr), sampler


def _with_inner(optimizer: torch.optim.Optimizer | None) -> list[torch.optim.Optimizer]:
    """The optimizer and, for layer-wise updates, the per-parameter optimizers that take the steps."""
    if optimizer is None:
        return []
    return [optimizer, *getattr(optimizer, "inner_optimizers", lambda: [])()]


def _group_setting(optimizer: torch.optim.Optimizer | None, key: str) -> Any:
    """`key` of the first parameter group that has it (GaLore's rank, update_proj_gap), else None."""
    return next((g[key] for opt in _with_inner(optimizer) for g in opt.param_groups if key in g), None)


def _set_gap(optimizer: torch.optim.Optimizer, gap: int) -> None:
    for opt in _with_inner(optimizer):
        for group in opt.param_groups:
            if "update_proj_gap" in group:
                group["update_proj_gap"] = gap


def _method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def run_train_memory_bench(
    shapes: tuple[str, ...] | list[str] = DEFAULT_SHAPES,
    methods: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Every method on every shape, each in its own process; rows, ratios to AdamW and the issue's goals."""
    methods = list(methods or METHODS)
    for name in methods:
        _method(name)
    for shape in shapes:
        shape_config(shape)
    rows: list[dict[str, Any]] = []
    total = len(shapes) * len(methods)
    for shape in shapes:
        for method in methods:
            if progress:
                progress(f"[{len(rows) + 1}/{total}] {shape} {method} ...")
            start = time.perf_counter()
            row = _in_subprocess(dict(options, shape=shape, method=method))
            rows.append(row)
            if progress:
                progress(f"    {_summary(row)} ({time.perf_counter() - start:.0f} s)")
    return {
        "options": options,
        "rows": rows,
        "goals": {shape: goals([r for r in rows if r["shape"] == shape]) for shape in shapes},
    }


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's four goals for one shape, as measured ratios (None where a row is missing or failed)."""
    by = {r["method"]: r for r in rows if "error" not in r}

    def ratio(a: str, b: str, key: str, key_b: str | None = None) -> float | None:
        if a not in by or b not in by or not by[b].get(key_b or key) or by[a].get(key) is None:
            return None
        return by[a][key] / by[b][key_b or key]

    paper = next(
        (m for m in ("galore-r128", "galore-r256") if m in by and by[m]["rank"] == _paper_rank(rows)), None
    )
    checks = {
        "galore_state_vs_adamw": (ratio(paper, "adamw", "optimizer_state_bytes") if paper else None, 0.35),
        "galore_8bit_layerwise_total_vs_adamw": (
            ratio("galore-8bit-layerwise", "adamw", "added_bytes"),
            0.45,
        ),
        # the same without activations: weights + peak gradients + optimizer state
        "galore_8bit_layerwise_weights_grads_state_vs_adamw": (
            ratio("galore-8bit-layerwise", "adamw", "model_state_bytes"),
            0.45,
        ),
        "zo_sgd_total_vs_inference": (ratio("zo-sgd", "inference", "added_bytes"), 1.2),
        "galore_step_time_over_gap_vs_adamw": (
            ratio(paper, "adamw", "step_time_over_gap_s", "step_time_s") if paper else None,
            1.3,
        ),
    }
    return {
        name: {"measured": value, "goal_at_most": limit, "met": None if value is None else value <= limit}
        for name, (value, limit) in checks.items()
    }


def _paper_rank(rows: list[dict[str, Any]]) -> int:
    ranks = [
        r["rank"] for r in rows if r.get("method") in ("galore-8bit", "galore-layerwise") and r.get("rank")
    ]
    return ranks[0] if ranks else PAPER_RANK.get(rows[0]["shape"], DEFAULT_RANK) if rows else DEFAULT_RANK


def _in_subprocess(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`measure_method(**kwargs)` in a fresh Python; a failure becomes a row with an `error`."""
    code = (
        "import json, sys; from effllm.bench.train_memory import measure_method; "
        "print('RESULT ' + json.dumps(measure_method(**json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return {
        "shape": kwargs["shape"],
        "method": kwargs["method"],
        "error": lines[-1] if lines else f"exited with status {proc.returncode}",
    }


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**2:,.0f}"


def _summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return (
        f"added {_mib(row['added_bytes'])} MiB, state {_mib(row['optimizer_state_bytes'])} MiB, "
        f"step {row['step_time_s']:.2f} s"
    )


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table per shape, then the goals."""
    lines = []
    for shape, checks in result["goals"].items():
        rows = [r for r in result["rows"] if r["shape"] == shape]
        ok = [r for r in rows if "error" not in r]
        base = next((r for r in ok if r["method"] == "adamw"), None)
        params = f" ({ok[0]['params'] / 1e6:.0f}M parameters)" if ok else ""
        lines += [
            f"{shape}{params}",
            "",
            "| method | weights MiB | grads peak MiB | optimizer state MiB | peak MiB | added MiB "
            "| vs AdamW | step s | step over gap s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} |||||||")
                continue
            rel = f"{r['added_bytes'] / base['added_bytes']:.2f}" if base and base["added_bytes"] else "-"
            lines.append(
                f"| {r['method']} | {_mib(r['weights_bytes'])} | {_mib(r['gradient_peak_bytes'])} "
                f"| {_mib(r['optimizer_state_bytes'])} | {_mib(r['peak_bytes'])} | {_mib(r['added_bytes'])} "
                f"| {rel} | {r['step_time_s']:.3f} | {r['step_time_over_gap_s']:.3f} |"
            )
        lines.append("")
        for name, check in checks.items():
            value = "-" if check["measured"] is None else f"{check['measured']:.2f}"
            verdict = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
            lines.append(f"- {name}: {value} (goal <= {check['goal_at_most']}): {verdict}")
        lines.append("")
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(DEFAULT_SHAPES),
        choices=sorted(SHAPES),
        metavar="SHAPE",
        help=f"model shapes, random weights (default: {' '.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to measure (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="GaLore rank of the 8-bit, layer-wise rows (default: the paper's: 60M 128, 350M 256)",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 autocast")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--json", action="store_true", help="print JSON only (progress still goes to stderr)")


def main(args: argparse.Namespace) -> int:
    for name, low in (
        ("--batch-size", args.batch_size),
        ("--seq-len", args.seq_len),
        ("--steps", args.steps),
    ):
        if low < 1:
            raise ConfigError(f"{name} must be at least 1, got {low}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be at least 0, got {args.warmup}")
    result = run_train_memory_bench(
        args.shapes,
        args.methods,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
        device=args.device,
        rank=args.rank,
    )
    if all("error" in r for r in result["rows"]):
        raise EffLLMError(f"every row failed; the first: {result['rows'][0]['error']}")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
