"""`effllm init-model`: write a small random checkpoint with a byte-level tokenizer.

Useful to try every command without a hub, and as the start of training from scratch. The weights are
random: the text it generates is noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effllm.core.errors import CheckpointError

PRESETS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "init-model",
        help="write a small random (untrained) llama checkpoint with a byte-level tokenizer",
        description=__doc__,
    )
    p.add_argument("out", help="folder to write (must not exist or be empty)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def init_model(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """Write a random llama of `preset` size with a byte-level tokenizer to `out`."""
    import torch

    from effllm.models import CausalLM, ModelConfig, save_model
    from effllm.models.tokenizer_training import build_byte_level_tokenizer

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new folder")
    tokenizer = build_byte_level_tokenizer()
    # A chat turn ends with <|im_end|>, plain text with <|endoftext|>: generation stops at either.
    eos = [tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")]
    config = ModelConfig(
        model_type="llama",
        vocab_size=tokenizer.vocab_size,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    model = CausalLM(config).to(getattr(torch, dtype))
    return save_model(model, out, tokenizer=tokenizer)


def run(args: argparse.Namespace) -> int:
    out = init_model(args.out, args.preset, args.seed, args.dtype)
    print(f"wrote a random, untrained {args.preset} llama to {out}")
    return 0
