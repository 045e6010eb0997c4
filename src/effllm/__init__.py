"""EffLLM: efficient LLMs, measured against the hardware's limit."""

__version__ = "0.1.0"
