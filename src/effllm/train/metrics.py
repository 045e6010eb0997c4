"""What a run reports: metrics.jsonl (one row per step), TensorBoard when installed, the loss curve PNG,
and model FLOPs utilisation (MFU) against a given or detected peak.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from effllm.models.config import ModelConfig

# Dense peak TFLOP/s per GPU (bf16 tensor cores; fp32 without TF32), by a fragment of the device name.
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "4090": (165.0, 82.6),
    "3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
}


class MetricsLogger:
    """Appends one JSON object per step to `path`, mirroring numbers to TensorBoard when asked and installed."""

    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115 (open for the logger's lifetime)
        self._tb = _tensorboard_writer(tensorboard_dir) if tensorboard_dir else None

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop rows after `last_step` (written by a run that died after its last checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Training (and held-out) loss against step, as a PNG; None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·H·Dh·T for attention scores and values
    (PaLM, Chowdhery et al. 2022, appendix B). N leaves out the input embedding, a lookup."""
    n = config.num_parameters() - (
        0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    )
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * n + attention


def detect_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Dense peak TFLOP/s of this process's device: a table for GPUs, cores x clock x FMA width for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return bf16 if precision == "bf16" else fp32
        return None
    if device.type == "cpu":
        return _cpu_peak_tflops(precision)
    return None


def _cpu_peak_tflops(precision: str = "fp32") -> float | None:
    """Peak from /proc/cpuinfo: cores x MHz x FLOPs per cycle per core.

    fp32: 2 FMA units x vector lanes x 2. bf16: AMX tiles do 1024 FLOPs per cycle (Intel's figure),
    AVX512-BF16 dot products twice fp32's; without either, bf16 runs at the fp32 rate at best.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    if not mhz:
        return None
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    flops_per_cycle = 2 * lanes * (2 if "fma" in flags or "avx512f" in flags else 1)
    if precision == "bf16":
        flops_per_cycle = (
            1024
            if "amx_bf16" in flags
            else 2 * flops_per_cycle
            if "avx512_bf16" in flags
            else flops_per_cycle
        )
    cores = min(torch.get_num_threads(), len(mhz))
    return cores * max(mhz) * 1e6 * flops_per_cycle / 1e12


def _tensorboard_writer(folder: str | os.PathLike) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))
