"""Microbenchmark of the CPU paged decode attention kernel (`kernels/cpu/attention.h`; docs/benchmarks.md):
one decode step's attention over 30 layers' caches, each layer its own tensor, as in the engine.

    python scripts/bench_paged_attention.py [--dtype bfloat16|float32] [--blocks random|sequential]
                                            [--no-huge-pages]

64 sequences of 200-640 keys (SmolLM-135M: 9 query heads, 3 kv heads, head dim 64, blocks of 16), the
blocks shuffled (as after many requests come and go) or in order, the caches on 2 MiB pages as the
engine's (`--cpu-huge-pages`) unless told not to. Reports ms per layer and the KV cache
read rate at 1 and 2 threads, best of 3, and whether the bfloat16 scores take AMX tiles.
"""

import argparse
import time

import torch

from effllm.core import huge_pages
from effllm.kernels.cpu_paged_attention import amx_scores_available, paged_decode_attention_cpu

SEQS, HEADS, KV_HEADS, DIM, BLOCK, LAYERS = 64, 9, 3, 64, 16, 30


def caches(dtype: torch.dtype, sequential: bool, huge: bool, gen: torch.Generator):
    lens = torch.randint(200, 640, (SEQS,), generator=gen)
    blocks = (lens + BLOCK - 1) // BLOCK
    total = int(blocks.sum())
    order = torch.arange(total) if sequential else torch.randperm(total, generator=gen)
    tables = torch.zeros(SEQS, int(blocks.max()), dtype=torch.int64)
    start = 0
    for b in range(SEQS):
        tables[b, : blocks[b]] = order[start : start + blocks[b]]
        start += int(blocks[b])
    k = [torch.randn(total, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype) for _ in range(LAYERS)]
    v = [torch.randn(total, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype) for _ in range(LAYERS)]
    moved = huge_pages.collapse(k + v) if huge else 0
    return lens, tables, k, v, moved


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--blocks", choices=["random", "sequential"], default="random")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    lens, tables, k, v, moved = caches(dtype, args.blocks == "sequential", args.huge_pages, gen)
    q = torch.randn(SEQS, HEADS, DIM, generator=gen).to(dtype)
    lo = torch.zeros(SEQS, dtype=torch.int64)
    cache_bytes = int(lens.sum()) * KV_HEADS * DIM * 2 * k[0].element_size() * LAYERS
    huge = f"{moved / 2**20:.0f} MiB moved into huge pages"
    print(f"{args.dtype} cache, {args.blocks} blocks, AMX scores: {amx_scores_available()}, {huge}")
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for layer in range(LAYERS):
                paged_decode_attention_cpu(q, k[layer], v[layer], tables, lens, lo, [], DIM**-0.5)
            best = min(best, time.perf_counter() - start)
        print(f"threads {threads}: {best * 1e3 / LAYERS:.3f} ms a layer, {cache_bytes / best / 1e9:.1f} GB/s")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
