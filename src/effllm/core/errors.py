"""Errors EffLLM raises on bad input.

Every error a user can cause derives from `EffLLMError`; its message is one line that says what was
wrong and what to do. The CLI prints it on stderr and exits 2; the server maps it to an HTTP status.
"""


class EffLLMError(Exception):
    """Base class of every user-facing EffLLM error."""

    http_status = 400


class ConfigError(EffLLMError):
    """A model or run configuration EffLLM cannot use."""


class CheckpointError(EffLLMError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


class TokenizerError(EffLLMError):
    """A tokenizer that cannot be loaded or used."""


class InputError(EffLLMError):
    """A request or prompt that cannot be served (too long, invalid parameters)."""
