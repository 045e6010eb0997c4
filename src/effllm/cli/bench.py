"""`effllm bench`: measured speed and memory, JSON with --json. Each benchmark is a module of effllm.bench."""

from __future__ import annotations

import argparse
import importlib

# subcommand -> (module, one-line help)
BENCHES = {
    "generate": ("effllm.bench.generate", "batch-1 prefill and decode tokens/s beside transformers"),
    "throughput": ("effllm.bench.throughput", "offline throughput of many requests beside transformers"),
    "quantized": ("effllm.bench.quantized", "dense and quantized variants of the same weights, side by side"),
    "kv-cache": (
        "effllm.bench.kv_cache",
        "one long-context workload over a bf16, int8 and int4 KV cache of one size",
    ),
    "spec-decode": (
        "effllm.bench.spec_decode",
        "speculative decoding (n-gram, draft model, early exit) against plain decoding, batch 1 and 16",
    ),
    "skip-decode": (
        "effllm.bench.skip_decode",
        "SkipDecode's exit schedules: decode speed and perplexity cost against full depth",
    ),
    "structured": (
        "effllm.bench.structured",
        "structured outputs (JSON schema, regex) against unconstrained decoding, batch 1 and batched",
    ),
    "sparse-matmul": (
        "effllm.bench.sparse_matmul",
        "a pruned linear as a CSR sparse product against the dense one, per sparsity and batch rows",
    ),
    "latency": ("effllm.bench.latency", "time to first token and per output token, chunked prefill on/off"),
    "load-memory": ("effllm.bench.load_memory", "peak RAM while loading a checkpoint, over its size"),
    "serve": ("effllm.bench.serve", "online load test of an OpenAI server: TTFT, TPOT, ITL, E2EL"),
    "train": ("effllm.bench.train", "training tokens/s, MFU and peak memory of one model and optimizer"),
    "train-memory": (
        "effllm.bench.train_memory",
        "memory (weights, grads, optimizer state, peak) and step time of each efficient method",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (JSON with --json)", description=__doc__)
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=help_text, description=module.__doc__)
        module.add_args(sub)
        sub.set_defaults(func=module.main)
