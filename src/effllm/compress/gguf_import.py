"""Import a llama-architecture GGUF file (llama.cpp's format) as a checkpoint folder EffLLM runs.

    effllm compress import-gguf model.gguf --out DIR      # then: effllm generate --model DIR ...

Q4_0 tensors become 4-bit `QuantizedLinear` layers in groups of 32 (symmetric: llama.cpp's x = d (u - 8) is
EffLLM's grid with scale d), so they stay 4-bit and run EffLLM's kernels; F32, F16, BF16, Q8_0 and Q4_1
tensors (and any other type `gguf` can dequantize) are dequantized to dense weights of `--dtype`. q/k rows
are permuted back from llama.cpp's interleaved RoPE layout to Hugging Face's. The "gpt2" (byte-level BPE)
tokenizer is rebuilt from the file's tokens and merges. The output is a Hugging Face folder (with a
compressed-tensors quantization_config when any layer stayed 4-bit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from effllm.compress.gguf_export import PARTS, require_gguf
from effllm.core.errors import InputError
from effllm.models.layouts import set_module
from effllm.models.quantized_linear import QuantizedLinear


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def unpermute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved q/k rows -> Hugging Face's rotate-half rows (inverse of gguf_export's)."""
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def q4_0_codes(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed codes [rows, cols] int8, scales [rows, cols / 32] float32) of Q4_0 blocks."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    u = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # byte j: element j (low), j + 16 (high)
    codes = torch.from_numpy(u.astype(np.int16) - 8).to(torch.int8).reshape(rows, cols)
    return codes, torch.from_numpy(d)


def _config(reader):
    from effllm.models import ModelConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InputError(f"GGUF architecture {arch!r} is not supported; EffLLM imports llama GGUF files")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type="llama",
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        eos_token_id=None if eos is None else int(eos),
    )


def _tokenizer(reader):
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from effllm.models.tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(
            f"GGUF tokenizer {kind!r} is not supported; EffLLM imports byte-level BPE ('gpt2') ones"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t, k in zip(tokens, types, strict=True) if k == 3]
    )
    config = {}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token"] = tokens[int(eos)]
    return Tokenizer(backend, config, chat_template=_field(reader, "tokenizer.chat_template"))


def import_gguf(path: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert the GGUF file `path` into a checkpoint folder `out` (which must not exist)."""
    from effllm.compress.schemes import W4A16, quantization_config
    from effllm.models import CausalLM, save_model

    gguf = require_gguf()
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise InputError(f"{path} is not a file; pass a .gguf file")
    if out.exists():
        raise InputError(f"{out} already exists; pass a new --out folder")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise InputError(f"{path} is not a readable GGUF file ({e})") from None
    config = _config(reader)
    tokenizer = _tokenizer(reader)
    model = CausalLM(config).to(dtype).eval()
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    targets = {
        "token_embd.weight": "model.embed_tokens",
        "output_norm.weight": "model.norm",
        "output.weight": "lm_head",
    }
    for i in range(config.num_hidden_layers):
        targets.update({f"blk.{i}.{gg}.weight": f"model.layers.{i}.{hf}" for hf, gg in PARTS.items()})
    quantized = False
    for tensor in reader.tensors:
        if tensor.name not in targets:
            continue  # rope_freqs and the like are computed, not loaded
        name = targets[tensor.name]
        part = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        module = model.get_submodule(name)
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
        cols = int(tensor.shape[0]) if len(tensor.shape) > 1 else 1
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0 and isinstance(module, nn.Linear):
            codes, scale = q4_0_codes(tensor.data, rows, cols)
            if part in heads:
                codes, scale = unpermute_rows(codes, heads[part]), unpermute_rows(scale, heads[part])
            q = QuantizedLinear.like(module, bits=4, group_size=32, symmetric=True)
            q.set_codes(codes, scale, None)
            set_module(model, name, q)
            quantized = True
            continue
        weight = torch.from_numpy(
            np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        )
        weight = weight.reshape(rows, cols) if cols > 1 else weight.reshape(rows)
        if part in heads:
            weight = unpermute_rows(weight, heads[part])
        with torch.no_grad():
            module.weight.copy_(weight.to(dtype))
    if config.tie_word_embeddings:
        model.tie_weights()
    if quantized:
        config.quantization_config = quantization_config(W4A16(group_size=32), model)
        config.quantization_config.pop("effllm_method", None)
    save_model(model, out, tokenizer=tokenizer)
    return out
