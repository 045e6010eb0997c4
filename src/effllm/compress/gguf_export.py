"""Export a (quantized) llama-family model to GGUF, writing llama.cpp's blocks from EffLLM's own codes.

llama.cpp's converter dequantizes quantized inputs and rounds them again; this writer keeps GPTQ's or
AWQ's rounding by mapping EffLLM's grids onto GGUF block types exactly (fp16 block scales are the only
rounding):

| EffLLM layer | GGUF type | block of 32 weights |
|---|---|---|
| W4A16 g32 symmetric (codes -8..7, scale s) | Q4_0 | fp16 d = s, 16 bytes: byte j = (q_j + 8) \\| (q_{j+16} + 8) << 4; x = d (u - 8) |
| W4A16 g32 asymmetric (codes q, zero z) | Q4_1 | fp16 d = s, fp16 m = -(z + 8) s, nibbles u = q + 8 as above; x = d u + m |
| W8A16 (per channel) | Q8_0 | fp16 d = the row's scale, 32 int8 codes; x = d q |
| dense linears, embeddings | BF16 or F32 | |
| norms | F32 | |

Other grids (groups of 64 or 128, W8A8) have no exact GGUF block and are refused with what to choose. q_proj
and k_proj rows are permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved one, as its
converter does. The tokenizer (byte-level BPE) is written as llama.cpp's "gpt2" model with its merges.
Needs the `gguf` package (`pip install gguf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effllm.core.errors import InputError
from effllm.models.quantized_linear import QuantizedLinear

PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (rows only: codes and scales alike)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def block_bytes(module: QuantizedLinear, heads: int | None = None) -> tuple[np.ndarray, str]:
    """(uint8 [N, bytes per row], GGUF type name) for one quantized layer, rows permuted for `heads`."""
    q, zero = module.codes()
    scale = module.weight_scale.float()
    n, k = q.shape
    if heads is not None:
        q, scale = permute_rows(q, heads), permute_rows(scale, heads)
        zero = None if zero is None else permute_rows(zero, heads)
    blocks = k // 32
    if module.bits == 8 and module.activation_bits == 16:
        d = _fp16_bytes(scale.expand(n, blocks))
        codes = q.reshape(n, blocks, 32).numpy().view(np.uint8)
        return np.concatenate([d, codes], -1).reshape(n, -1), "Q8_0"
    if module.bits == 4 and module.group_size == 32 and module.activation_bits == 16:
        u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, blocks, 32)
        nibbles = (u[..., :16] | (u[..., 16:] << 4)).numpy()
        if zero is None:
            return np.concatenate([_fp16_bytes(scale), nibbles], -1).reshape(n, -1), "Q4_0"
        m = -(zero.float() + 8) * scale
        return np.concatenate([_fp16_bytes(scale), _fp16_bytes(m), nibbles], -1).reshape(n, -1), "Q4_1"
    raise InputError(
        f"a W{module.bits}A{module.activation_bits} layer with group size {module.group_size} has no exact GGUF "
        "block; quantize with --scheme w4a16 --group-size 32 or --scheme w8a16 to export GGUF"
    )


def check_tokenizer(tokenizer) -> None:
    """Raise InputError unless llama.cpp can read `tokenizer` (byte-level BPE with merges)."""
    spec = json.loads(tokenizer.backend.to_str()).get("model", {})
    if spec.get("type") != "BPE":
        raise InputError("GGUF export supports byte-level BPE tokenizers; this one is not BPE")
    if not spec.get("merges"):
        raise InputError(
            "the tokenizer has no BPE merges, which llama.cpp needs; export a trained BPE tokenizer"
        )


def _tokenizer_metadata(writer, tokenizer, vocab_size: int, gguf) -> None:
    check_tokenizer(tokenizer)
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise InputError("GGUF export supports byte-level BPE tokenizers; this one is not BPE")
    tokens = [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(vocab_size)]
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise InputError(
            "the tokenizer has no BPE merges, which llama.cpp needs; export a trained BPE tokenizer"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tokenizer.eos_token_id
    if eos is not None:
        writer.add_eos_token_id(eos)
    if getattr(tokenizer, "bos_token_id", None) is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)


def export_gguf(model: nn.Module, tokenizer, path: str | Path, dense: str = "bf16") -> Path:
    """Write `model` (dense layers as `dense`: bf16 or f32) and its tokenizer (None: no tokenizer, for
    token-id benchmarks) to a GGUF file at `path`."""
    gguf = require_gguf()
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral") or cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise InputError(
            f"GGUF export supports bias-free llama/mistral models, not {cfg.model_type} with biases"
        )
    if cfg.rope_type != "default":
        raise InputError(f"GGUF export supports default RoPE, not {cfg.rope_type}")
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    dense_type = gguf.GGMLQuantizationType.BF16 if dense == "bf16" else gguf.GGMLQuantizationType.F32
    tensors: list[tuple[str, np.ndarray, object, object]] = []  # (name, data, raw shape, raw type)

    def add_dense(name: str, t: torch.Tensor, norm: bool = False) -> None:
        t = t.detach().float().contiguous()
        if norm or dense == "f32":
            tensors.append((name, t.numpy(), None, None))
        else:
            bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            tensors.append((name, bits, tuple(t.shape), dense_type))

    def add_linear(name: str, module: nn.Module, heads: int | None) -> None:
        if isinstance(module, QuantizedLinear):
            data, kind = block_bytes(module, heads)  # raises, before anything is written, on other grids
            tensors.append((name, data, None, getattr(gguf.GGMLQuantizationType, kind)))
        else:
            w = module.weight.detach()
            add_dense(name, permute_rows(w, heads) if heads else w)

    add_dense("token_embd.weight", model.model.embed_tokens.weight)
    heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
    for i, layer in enumerate(model.model.layers):
        for part, target in PARTS.items():
            module = layer.get_submodule(part)
            if isinstance(module, (QuantizedLinear, nn.Linear)):
                add_linear(f"blk.{i}.{target}.weight", module, heads.get(part))
            else:
                add_dense(f"blk.{i}.{target}.weight", module.weight, norm=True)
    add_dense("output_norm.weight", model.model.norm.weight, norm=True)
    if not cfg.tie_word_embeddings:
        add_linear("output.weight", model.lm_head, None)
    kinds = {t[3] for t in tensors if t[3] is not None and t[3] != dense_type}
    file_type = {
        gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
        gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
        gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    }.get(next(iter(kinds)) if len(kinds) == 1 else None, gguf.LlamaFileType.MOSTLY_BF16)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("effllm export")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    if tokenizer is None:  # token ids only (benchmarks): llama.cpp's "none" tokenizer
        writer.add_tokenizer_model("none")
    else:
        _tokenizer_metadata(writer, tokenizer, cfg.vocab_size, gguf)
    for name, data, shape, kind in tensors:
        writer.add_tensor(name, data, raw_shape=shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
