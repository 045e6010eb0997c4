"""`PagedKVCache`: the preallocated key and value tensors of every layer, and how many blocks fit.

Per layer k and v are [num_blocks + 1, block_size, kv_heads, head_dim]. The extra last block is a
scratch block no request owns: padded rows of a CUDA-graph batch write into it and read from it.
The cache owns how keys and values are stored: backends call `write`, so a cache that stores them
differently (quantized, say) changes this file, not the backends' callers.
"""

from __future__ import annotations

import logging

import torch

from effllm.core.errors import ConfigError
from effllm.engine.config import CPU_MAX_KV_CACHE_BYTES, EngineConfig, parse_memory
from effllm.kernels.paged_attention import write_kv
from effllm.models.config import ModelConfig

log = logging.getLogger(__name__)


def block_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, keys and values."""
    per_token = 2 * model_config.num_key_value_heads * model_config.head_dim * dtype.itemsize
    return model_config.num_hidden_layers * block_size * per_token


def num_kv_blocks(
    config: EngineConfig,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    activation_bytes: int = 0,
) -> int:
    """How many blocks the budget holds: num_kv_blocks if set, else kv_cache_memory, else (CUDA) the
    free memory up to gpu_memory_utilization less `activation_bytes`, else (CPU) 2 GiB at most."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = block_bytes(model_config, config.block_size, dtype)
    if config.kv_cache_memory is not None:
        budget = parse_memory(config.kv_cache_memory)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * config.gpu_memory_utilization) - (total - free) - activation_bytes
    else:
        # Never more than the running sequences could fill, so small models do not take 2 GiB.
        most = config.max_num_seqs * -(-config.max_model_len // config.block_size) * per_block
        budget = min(CPU_MAX_KV_CACHE_BYTES, most)
    blocks = budget // per_block
    if blocks < 1:
        raise ConfigError(
            f"the KV-cache budget ({budget / 2**20:.1f} MiB) holds no block of {per_block / 2**20:.2f} MiB; "
            "raise --kv-cache-memory (or gpu_memory_utilization)"
        )
    return blocks


class PagedKVCache:
    def __init__(
        self,
        model_config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_blocks + 1, block_size, model_config.num_key_value_heads, model_config.head_dim)
        # Zeros, not empty: masked-out keys are multiplied by zero weights, and 0 * NaN garbage is NaN.
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.device = torch.device(device)
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            block_size,
            2 * sum(t.numel() * t.element_size() for t in self.k) / 2**20,
        )

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new keys and values k, v [tokens, kv_heads, head_dim] of a layer at flat slots [tokens]."""
        write_kv(self.k[layer_idx], self.v[layer_idx], k, v, slot_mapping)
