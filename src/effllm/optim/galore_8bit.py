"""GaLoreAdamW8bit: GaLore with both Adam moments stored in blockwise 8-bit (no bitsandbytes needed)."""

from collections.abc import Iterable
from typing import Any

import torch

from effllm.core.errors import ConfigError
from effllm.optim.galore import GaLoreAdamW
from effllm.optim.quantize8bit import dequantize_blockwise, dynamic_code, quantize_blockwise


class GaLoreAdamW8bit(GaLoreAdamW):
    """`GaLoreAdamW` whose moments live in 8 bits between steps (the GaLore paper's "8-bit GaLore").

    Each step dequantizes one parameter's moments to float32, takes the Adam step and quantizes them
    back (Dettmers et al. 2022, blockwise with a dynamic code: signed for M, unsigned for V), so the
    float32 copy exists for one parameter at a time. As in bitsandbytes, moments with fewer than
    `min_8bit_size` elements stay in 32 bits. The low-rank moments of a projected matrix are what get
    quantized; the projection bases stay in the parameter's dtype.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        seed: int = 0,
        block_size: int = 2048,
        min_8bit_size: int = 4096,
    ):
        if block_size < 1 or min_8bit_size < 0:
            raise ConfigError(
                f"block_size must be >= 1 and min_8bit_size >= 0, got {block_size} and {min_8bit_size}"
            )
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self._code = {"exp_avg": dynamic_code(signed=True), "exp_avg_sq": dynamic_code(signed=False)}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed)

    def _load_moments(
        self, state: dict[str, Any], prefix: str, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if like.numel() < self.min_8bit_size:
            return super()._load_moments(state, prefix, like)
        if prefix + "exp_avg_q" not in state:
            zeros = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
            return zeros, zeros.clone()
        return self._dequantize(state, prefix, "exp_avg", like), self._dequantize(
            state, prefix, "exp_avg_sq", like
        )

    def _store_moments(
        self, state: dict[str, Any], prefix: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
    ) -> None:
        if exp_avg.numel() < self.min_8bit_size:
            return
        for name, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            indices, absmax = quantize_blockwise(moment, self._code[name], self.block_size)
            state[prefix + name + "_q"] = indices
            state[prefix + name + "_absmax"] = absmax

    def _dequantize(self, state: dict[str, Any], prefix: str, name: str, like: torch.Tensor) -> torch.Tensor:
        key = prefix + name
        return dequantize_blockwise(
            state[key + "_q"], state[key + "_absmax"], self._code[name], self.block_size, like.shape
        )
