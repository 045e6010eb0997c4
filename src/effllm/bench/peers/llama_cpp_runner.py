"""llama.cpp (through llama-cpp-python) on a Hugging Face llama folder: batch-1 prefill and decode tokens/s.

Run with the python of a venv that has llama-cpp-python, gguf and numpy (scripts/peers/install_llama_cpp.sh):

    PEER_PYTHON llama_cpp_runner.py --model DIR --dtype float32 --prompt-tokens 512 --new-tokens 128 --reps 3

It writes DIR's weights to a GGUF file with the `gguf` package (f32 or bf16, q/k permuted for llama.cpp's
rope as its own converter does, no tokenizer: the benchmark's prompts are token ids), then, like
llama-bench's pp and tg after a prompt, times the prompt's evaluation and `--new-tokens` single-token
decodes (greedy, each from the last logits). Prints one JSON object. Imports nothing of EffLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time

import numpy as np


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors as numpy (bf16 kept as its raw uint16 bits)."""
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    kinds = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype=kinds[entry["dtype"]]).reshape(entry["shape"])
    return out


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (its convert_hf_to_gguf does the same)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: str, dtype: str, out: str) -> None:
    import gguf

    cfg = read_config(folder)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("none")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_BF16)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
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
    for name, t in read_safetensors(folder).items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            key = ".".join(rest[:-1])
            target = f"blk.{i}.{parts[key]}.weight"
            if key == "self_attn.q_proj":
                t = permute(t, heads)
            elif key == "self_attn.k_proj":
                t = permute(t, kv_heads)
        else:
            target = names[name]
        t = np.ascontiguousarray(t)
        if t.ndim == 1 or dtype == "float32":  # norms stay f32, as llama.cpp's converter keeps them
            t = t.astype(np.float32) if t.dtype != np.uint16 else (t.astype(np.uint32) << 16).view(np.float32)
            w.add_tensor(target, t)
        else:
            w.add_tensor(target, t, raw_shape=t.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gguf", default=None, help="time this GGUF file instead of writing one from --model")
    args = p.parse_args()
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        path = args.gguf or os.path.join(tmp, "model.gguf")
        if args.gguf is None:
            write_gguf(args.model, args.dtype, path)
        llm = llama_cpp.Llama(
            path,
            n_ctx=args.prompt_tokens + args.new_tokens + 16,
            n_batch=args.prompt_tokens,
            n_ubatch=args.prompt_tokens,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )
        vocab = read_config(args.model)["vocab_size"]
        prompt = np.random.default_rng(1).integers(0, vocab, args.prompt_tokens).tolist()
        prefill, decode = [], []
        for rep in range(args.reps + 1):  # the first is a warm-up
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            mid = time.perf_counter()
            for _ in range(args.new_tokens):  # greedy: the next token from the last position's logits
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
                llm.eval([int(np.argmax(logits))])
            end = time.perf_counter()
            if rep:
                prefill.append(args.prompt_tokens / (mid - start))
                decode.append(args.new_tokens / (end - mid))
    print(
        json.dumps(
            {
                "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                "prefill_tokens_per_s": statistics.median(prefill),
                "decode_tokens_per_s": statistics.median(decode),
                "prefill_runs": [round(x, 2) for x in prefill],
                "decode_runs": [round(x, 2) for x in decode],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
