"""Choosing dtypes and devices from user strings."""

from __future__ import annotations

import torch

from effllm.core.errors import EffLLMError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn 'bf16', 'float32', a torch.dtype or None into a torch.dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise EffLLMError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or auto)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The Hugging Face spelling of a dtype ('bfloat16'), as config.json stores it."""
    return str(dtype).removeprefix("torch.")


def parse_device(device: str | torch.device | None) -> torch.device:
    """Turn 'cpu', 'cuda', 'cuda:1', a torch.device or None (best available) into a torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EffLLMError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EffLLMError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev
