"""Model shapes the benchmarks build with random weights: analyze's presets plus a tiny one for smoke runs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from effllm.analyze.shapes import PRESETS
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

SHAPES: dict[str, dict] = {
    **PRESETS,
    "tiny": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig.from_hf_dict(SHAPES[name])


@contextmanager
def bench_checkpoint(model_path: str | None, shape: str, dtype: str) -> Iterator[tuple[str, str]]:
    """(folder, label) of the model to measure: `model_path` as is, or random weights of `shape` saved to a
    temporary folder (so that peers such as transformers load the very same weights)."""
    if model_path is not None:
        yield model_path, model_path
        return
    import torch

    from effllm.models import CausalLM, save_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "model")
        save_model(CausalLM(shape_config(shape)).to(getattr(torch, dtype)), folder)
        yield folder, shape


def add_model_args(parser) -> None:
    """--model / --shape / --dtype, as every benchmark that measures one model takes them."""
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (default: random weights of --shape)"
    )
    parser.add_argument("--shape", default="smollm-135m", choices=sorted(SHAPES), help="random model shape")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


# --dtype above is the measured model's dtype, so the engine's own dtype option is left out.
_ENGINE_EXCLUDED = ("dtype",)


def add_engine_args(parser, defaults: dict | None = None) -> None:
    """Every engine option (EngineConfig fields), spelled as `effllm serve` and `effllm generate` spell them."""
    from effllm.engine.config import add_engine_flags

    add_engine_flags(
        parser.add_argument_group("engine options (EngineConfig fields)"),
        exclude=_ENGINE_EXCLUDED,
        defaults=defaults,
    )


def engine_args(args) -> dict:
    """The engine options given on the command line."""
    from effllm.engine.config import engine_options

    return engine_options(args, _ENGINE_EXCLUDED)
