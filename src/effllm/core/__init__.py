"""Shared foundations: errors, dtype and device choice."""

from effllm.core.errors import EffLLMError

__all__ = ["EffLLMError"]
