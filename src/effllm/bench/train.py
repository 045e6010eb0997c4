"""`effllm bench train`: training throughput (tokens/s), peak memory and MFU of one model shape.

The default is the GaLore paper's smallest llama (60M parameters: hidden 512, 8 layers, 8 heads,
intermediate 1376, vocab 32000) with AdamW, random weights and random tokens, stepped by the trainer's own
`train_step` (accumulation, clipping and all). Warm-up steps are not timed. Peak memory is the process's
resident high-water mark on CPU (reset before the model is built) and the allocator's peak on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from effllm.bench.shapes import SHAPES, shape_config
from effllm.core.dtypes import parse_device
from effllm.models.config import ModelConfig
from effllm.models.transformer import CausalLM
from effllm.optim import build_optimizer
from effllm.train.distributed import Distributed
from effllm.train.metrics import detect_peak_tflops, flops_per_token
from effllm.train.trainer import train_step


def run_train_bench(
    shape: str = "galore-60m",
    config: ModelConfig | None = None,
    batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 10,
    warmup: int = 2,
    grad_accum: int = 1,
    optimizer: str = "adamw",
    optimizer_options: dict[str, Any] | None = None,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    device: str | None = None,
    lr: float = 1e-4,
    peak_tflops: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train `config` (or the named `shape`) on random tokens for `warmup` + `steps` steps; time the last `steps`."""
    name = "custom" if config is not None else shape
    config = config or shape_config(shape)
    dev = parse_device(device)
    baseline = reset_peak_memory(dev)
    torch.manual_seed(seed)
    model = CausalLM(config).to(dev).train()
    model.set_activation_checkpointing(activation_checkpointing)
    opt = build_optimizer(optimizer, model, lr, 0.0, **(optimizer_options or {}))
    env = Distributed(0, 1, 0, dev)
    generator = torch.Generator().manual_seed(seed)

    def micro_batches() -> list[dict[str, torch.Tensor]]:
        batches = []
        for _ in range(grad_accum):
            ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
            batches.append({"input_ids": ids[:, :-1].to(dev), "labels": ids[:, 1:].to(dev)})
        return batches

    times, loss = [], float("nan")
    for step in range(warmup + steps):
        batches = micro_batches()
        start = time.perf_counter()
        loss = train_step(model, opt, batches, env=env, precision=precision, clip_grad=1.0).loss
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= warmup:
            times.append(time.perf_counter() - start)

    tokens_per_step = batch_size * seq_len * grad_accum
    step_time = statistics.median(times)
    peak = peak_tflops or detect_peak_tflops(dev, precision)
    achieved = flops_per_token(config, seq_len) * tokens_per_step / step_time / 1e12
    return {
        "shape": name,
        "params": config.num_parameters(),
        "optimizer": optimizer,
        "precision": precision,
        "activation_checkpointing": activation_checkpointing,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "steps": steps,
        "tokens_per_s": tokens_per_step / step_time,
        "tokens_per_s_mean": tokens_per_step * len(times) / sum(times),
        "step_time_s": step_time,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "peak_memory_bytes": (peak_memory := peak_memory_bytes(dev)),
        "added_memory_bytes": None if peak_memory is None else peak_memory - baseline,
        "memory_kind": "cuda max allocated" if dev.type == "cuda" else "process peak RSS (VmHWM)",
        "final_loss": loss,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape", default="galore-60m", choices=sorted(SHAPES), help="model shape (random weights)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument(
        "--optimizer", default="adamw", help="optimizer name, as effllm train takes (default adamw)"
    )
    parser.add_argument(
        "--optimizer-options", nargs="+", default=[], metavar="KEY=VALUE", help="optimizer options"
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 autocast")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute layers in backward"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: detected)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    from effllm.core.flags import parse_key_values

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_train_bench(
        args.shape,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
        optimizer_options=parse_key_values(args.optimizer_options, "--optimizer-options"),
        precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
        device=args.device,
        peak_tflops=args.peak_tflops,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mfu = f"{result['mfu']:.1%} of {result['peak_tflops']:.2f} TFLOP/s" if result["mfu"] else "n/a (no peak)"
    print(
        f"{result['shape']} ({result['params'] / 1e6:.1f}M params), {result['optimizer']}, {result['precision']}, "
        f"batch {result['batch_size']}x{result['seq_len']}x{result['grad_accum']} on {result['device']} "
        f"({result['threads']} threads)"
    )
    print(
        f"  {result['tokens_per_s']:,.0f} tokens/s (median step {result['step_time_s']:.3f} s), "
        f"{result['achieved_tflops'] * 1e3:.1f} GFLOP/s, MFU {mfu}"
    )
    print(
        f"  peak memory {result['peak_memory_bytes'] / 1024**2:,.0f} MiB ({result['memory_kind']}), "
        f"{result['added_memory_bytes'] / 1024**2:,.0f} MiB above the process before the model"
    )
    return 0


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak; return the memory in use now (the baseline the run adds to)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(
        OSError
    ):  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    return peak_memory_bytes(device) or 0


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return None
