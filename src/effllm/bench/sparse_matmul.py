"""`effllm bench sparse-matmul`: a pruned linear run as a CSR sparse product (`SparseLinear`) against the
dense product over the same zeros, float32 on CPU, per sparsity and batch rows.

For each weight shape, sparsity (unstructured: random positions; `2:4`: 2 zeros in every 4 inputs) and row
count M, both products run in turn (`--reps` rounds of `--iters` calls each, interleaved so that machine
noise hits both alike); the result is the median time per call and dense/sparse speedup, and per M the
lowest sparsity at which CSR wins (the crossover `--sparse-linears` should be set above).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from effllm.core.errors import ConfigError
from effllm.models.sparse_linear import SparseLinear

DEFAULT_SHAPES = ("384x1024", "1024x384", "576x1536", "1536x576")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shapes",
        default=",".join(DEFAULT_SHAPES),
        help="weight shapes IN x OUT, comma-separated (default: the default model's and SmolLM-135M's MLP)",
    )
    p.add_argument(
        "--sparsities", default="0.5,2:4,0.7,0.8,0.9,0.95", help="shares of zeros, or N:M patterns"
    )
    p.add_argument("--rows", default="1,4,16,128", help="batch rows M of the input")
    p.add_argument("--iters", type=int, default=50, help="calls per timed round")
    p.add_argument("--reps", type=int, default=5, help="interleaved timed rounds (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print JSON to stdout")


def _list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"--{what} needs at least one value")
    return items


def pruned_weight(in_features: int, out_features: int, spec: str, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_features, in_features, generator=gen)
    if ":" in spec:
        zeros, group = (int(x) for x in spec.split(":"))
        if in_features % group:
            raise ConfigError(f"{spec} needs the input size to divide by {group}, got {in_features}")
        scores = torch.rand(out_features, in_features // group, group, generator=gen)
        idx = scores.argsort(-1)[..., :zeros]
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True).reshape_as(w)
    else:
        share = float(spec)
        if not 0 <= share < 1:
            raise ConfigError(f"a sparsity is a share of zeros in [0, 1), got {spec}")
        mask = torch.rand(w.shape, generator=gen) < share
    return w.masked_fill(mask, 0.0)


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


@torch.inference_mode()
def run(shapes, sparsities, rows, iters: int = 50, reps: int = 5) -> dict:
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in shapes:
        try:
            in_features, out_features = (int(x) for x in shape.lower().split("x"))
        except ValueError:
            raise ConfigError(f"a shape is INxOUT (e.g. 384x1024), not {shape!r}") from None
        for spec in sparsities:
            w = pruned_weight(in_features, out_features, spec, gen)
            sparse = SparseLinear(w)
            for m in rows:
                x = torch.randn(m, in_features, generator=gen)
                torch.testing.assert_close(sparse(x), F.linear(x, w), rtol=1e-4, atol=1e-4)
                F.linear(x, w), sparse(x)  # warm-up
                dense_t, sparse_t = [], []
                for _ in range(reps):
                    dense_t.append(_time(lambda: F.linear(x, w), iters))  # noqa: B023
                    sparse_t.append(_time(lambda: sparse(x), iters))  # noqa: B023
                d, s = statistics.median(dense_t), statistics.median(sparse_t)
                results.append(
                    {
                        "shape": f"{in_features}x{out_features}",
                        "sparsity": spec,
                        "zeros": round(sparse.sparsity, 4),
                        "rows": m,
                        "dense_us": round(d * 1e6, 2),
                        "sparse_us": round(s * 1e6, 2),
                        "speedup": round(d / s, 3),
                    }
                )
    crossover = {}
    for m in rows:
        mine = [r for r in results if r["rows"] == m]
        # the lowest sparsity from which CSR wins on every shape and every sparsity above it
        ok = [
            z
            for z in sorted({r["zeros"] for r in mine})
            if all(r["speedup"] >= 1 for r in mine if r["zeros"] >= z)
        ]
        crossover[str(m)] = ok[0] if ok else None
    return {"threads": torch.get_num_threads(), "results": results, "crossover": crossover}


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(x) for x in _list(args.rows, "rows")]
    if min(rows) < 1 or args.iters < 1 or args.reps < 1:
        raise ConfigError("--rows, --iters and --reps must be at least 1")
    data = run(
        _list(args.shapes, "shapes"), _list(args.sparsities, "sparsities"), rows, args.iters, args.reps
    )
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"float32, {data['threads']} threads; time per call, dense F.linear vs CSR SparseLinear")
    print(f"{'shape':>10} {'sparsity':>8} {'M':>4} {'dense us':>9} {'CSR us':>9} {'speedup':>8}")
    for r in data["results"]:
        print(
            f"{r['shape']:>10} {r['sparsity']:>8} {r['rows']:>4} {r['dense_us']:9.1f} {r['sparse_us']:9.1f} "
            f"{r['speedup']:7.2f}x"
        )
    for m, z in data["crossover"].items():
        print(
            f"M={m}: CSR wins on every shape from {z:.0%} zeros"
            if z
            else f"M={m}: CSR never wins on every shape"
        )
    return 0
