"""`PagedKVCache`: the preallocated key and value tensors of every layer, and how many blocks fit.

Per layer k and v are [num_blocks + 1, block_size, kv_heads, head_dim]. The extra last block is a
scratch block no request owns: padded rows of a CUDA-graph batch write into it and read from it.
The cache owns how keys and values are stored: backends call `write`, so a cache that stores them
differently changes this file, not the backends' callers.

With `kv_bits` 8 or 4 (`--kv-cache-dtype int8|int4`) k and v hold uint8 codes [..., head_dim * bits / 8]
and `k_params`, `v_params` [..., 2] float16 a step and a minimum per token and head
(`kernels/kv_quant.py`); `write` quantizes and returns what a reader will get back, so a prefill chunk
attends over the same values that later steps read from the cache.
"""

from __future__ import annotations

import logging

import torch

from effllm.core.errors import ConfigError
from effllm.core.huge_pages import advise as advise_huge_pages
from effllm.engine.config import CPU_MAX_KV_CACHE_BYTES, EngineConfig, parse_memory
from effllm.kernels.kv_quant import PARAMS, code_width, dequantize_kv, kv_bits, quantize_kv, token_head_bytes
from effllm.kernels.paged_attention import write_kv
from effllm.models.config import ModelConfig

log = logging.getLogger(__name__)


def block_bytes(
    model_config: ModelConfig, block_size: int, dtype: torch.dtype, kv_bits: int | None = None
) -> int:
    """Bytes of one block across all layers, keys and values (codes and their scales when quantized)."""
    per_token = 2 * model_config.num_key_value_heads * token_head_bytes(model_config.head_dim, kv_bits, dtype)
    return model_config.num_hidden_layers * block_size * per_token


def resolve_kv_bits(kv_cache_dtype: str, model_config: ModelConfig) -> int | None:
    """8, 4 or None (the model's dtype) for `--kv-cache-dtype`; `auto` takes what a quantized checkpoint's
    config.json asks for (`quantization_config.kv_cache_dtype`, written by the w4a8kv4 scheme)."""
    if kv_cache_dtype == "auto":
        kv_cache_dtype = (model_config.quantization_config or {}).get("kv_cache_dtype", "auto")
    bits = kv_bits(kv_cache_dtype)
    if bits is not None:
        code_width(model_config.head_dim, bits)  # ConfigError for an odd head_dim at int4
    return bits


def num_kv_blocks(
    config: EngineConfig,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    activation_bytes: int = 0,
    kv_bits: int | None = None,
) -> int:
    """How many blocks the budget holds: num_kv_blocks if set, else kv_cache_memory, else (CUDA) the
    free memory up to gpu_memory_utilization less `activation_bytes`, else (CPU) 2 GiB at most."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = block_bytes(model_config, config.block_size, dtype, kv_bits)
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
        kv_bits: int | None = None,
        huge_pages: bool = False,
    ):
        layers, d = model_config.num_hidden_layers, model_config.head_dim
        shape = (num_blocks + 1, block_size, model_config.num_key_value_heads)
        width, store = (d, dtype) if kv_bits is None else (code_width(d, kv_bits), torch.uint8)

        def tensors(last: int, kind: torch.dtype) -> list[torch.Tensor]:
            out = [torch.empty(*shape, last, dtype=kind, device=device) for _ in range(layers)]
            if huge_pages:  # before the first write, so that its page faults take 2 MiB pages
                advise_huge_pages(out)
            # Zeros, not garbage: masked-out keys are multiplied by zero weights, and 0 * NaN garbage is NaN.
            return [t.zero_() for t in out]

        self.k, self.v = tensors(width, store), tensors(width, store)
        self.k_params = self.v_params = None
        if kv_bits is not None:
            self.k_params, self.v_params = tensors(PARAMS, torch.float16), tensors(PARAMS, torch.float16)
        self.kv_bits = kv_bits
        self.dtype = dtype  # what readers get back
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.device = torch.device(device)
        params = [] if kv_bits is None else self.k_params + self.v_params
        total = sum(t.numel() * t.element_size() for t in self.k + self.v + params)
        log.info(
            "KV cache: %d blocks of %d tokens, %s (%.1f MiB)",
            num_blocks,
            block_size,
            str(dtype).removeprefix("torch.") if kv_bits is None else f"int{kv_bits}",
            total / 2**20,
        )

    def write(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values k, v [tokens, kv_heads, head_dim] of a layer at flat slots [tokens];
        returns them as a reader of the cache will see them (dequantized when the cache is quantized)."""
        if self.kv_bits is None:
            write_kv(self.k[layer_idx], self.v[layer_idx], k, v, slot_mapping)
            return k, v
        kc, kp = quantize_kv(k, self.kv_bits)
        vc, vp = quantize_kv(v, self.kv_bits)
        write_kv(self.k[layer_idx], self.v[layer_idx], kc, vc, slot_mapping)
        write_kv(self.k_params[layer_idx], self.v_params[layer_idx], kp, vp, slot_mapping)
        return (
            dequantize_kv(kc, kp, self.kv_bits, k.dtype),
            dequantize_kv(vc, vp, self.kv_bits, v.dtype),
        )

    def quantized_args(self, layer_idx: int) -> dict:
        """The keyword arguments the kernels take for this layer's codes: params and bits (none unquantized)."""
        if self.kv_bits is None:
            return {}
        return {
            "k_params": self.k_params[layer_idx],
            "v_params": self.v_params[layer_idx],
            "kv_bits": self.kv_bits,
        }
