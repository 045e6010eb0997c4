"""How much memory a device has free, so that a model too large for it is refused before it is allocated."""

from __future__ import annotations

from pathlib import Path

import torch

from effllm.core.errors import ConfigError


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: CUDA's free bytes, or the host's MemAvailable (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "meta":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """ConfigError, in one line, when `needed` bytes exceed what `device` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ConfigError(
            f"{what} needs {needed / 2**30:.2f} GiB but {device.type} has {free / 2**30:.2f} GiB free; "
            "use a smaller model or dtype, or free memory"
        )
