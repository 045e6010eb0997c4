"""`EngineConfig`: every engine option in one flat dataclass (a CLI flag is a field).

Defaults that depend on the device (token budget, sequence cap, KV-cache size) are left as None here
and resolved by `resolve` once the model and device are known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from effllm.core.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}

# CPU: a step of 512 tokens keeps the GEMMs near peak and a step near half a second for a 135M model.
CPU_MAX_NUM_BATCHED_TOKENS = 512
CPU_MAX_NUM_SEQS = 64
CPU_MAX_KV_CACHE_BYTES = 2 * 1024**3


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as '2GiB', '512MiB', '1.5GB' or '4e9'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read the memory size {value!r}; write bytes or e.g. '2GiB', '512MiB', '4GB'")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class EngineConfig:
    """Options of the inference engine (`LLM(model, **options)`, `effllm generate/serve/bench`)."""

    block_size: int = 16
    # KV cache: bytes (or '2GiB'); None = 2 GiB at most on CPU (less when fewer tokens can ever be held),
    # gpu_memory_utilization of the GPU on CUDA. num_kv_blocks overrides both (tests, tuning).
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    # One token budget per step and a cap on running sequences; None = chosen per device.
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    # Longest prompt + output; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str | None = None
    device: str | None = None
    # CUDA graphs capture pure-decode steps on CUDA; enforce_eager turns them off.
    enforce_eager: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.kv_cache_memory is not None and parse_memory(self.kv_cache_memory) <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")

    def resolve(self, max_position_embeddings: int, device: torch.device) -> EngineConfig:
        """A copy with the device-dependent defaults filled in and the limits made consistent."""
        gpu_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        if device.type == "cuda":
            budget, seqs = (16384, 1024) if gpu_mem >= 70 * 1024**3 else (8192, 256)
        else:
            budget, seqs = CPU_MAX_NUM_BATCHED_TOKENS, CPU_MAX_NUM_SEQS
        max_model_len = self.max_model_len or max_position_embeddings
        if max_model_len > max_position_embeddings:
            raise ConfigError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                f"{max_position_embeddings}; lower it"
            )
        max_num_seqs = self.max_num_seqs or min(seqs, self.max_num_batched_tokens or seqs)
        max_tokens = self.max_num_batched_tokens or max(budget, max_num_seqs)
        if max_tokens < max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({max_tokens}) must be at least max_num_seqs ({max_num_seqs}), "
                "so every running sequence can decode in one step; raise the budget or lower max_num_seqs"
            )
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step.
            max_tokens = max(max_tokens, max_model_len)
        return replace(self, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_tokens)
