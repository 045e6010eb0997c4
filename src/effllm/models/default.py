"""Where the embedded default model lives: the `--model` of every command when none is given."""

from __future__ import annotations

from pathlib import Path

from effllm.core.errors import CheckpointError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default-model"


def default_model_path() -> Path:
    """The folder of the model shipped inside the package, or a clear error while none ships."""
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        return DEFAULT_MODEL_DIR
    raise CheckpointError(
        f"no --model given and the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall "
        "EffLLM or pass --model FOLDER"
    )


def model_or_default(model: str | None) -> str:
    return model if model else str(default_model_path())
