"""What eDKM's saved-tensor compression saves in a DKM training step (issue #19; docs/training-methods.md).

    python scripts/edkm_memory.py [--bits 3] [--batch 8] [--seq-len 256] [--steps 3]

Each arm runs in its own process: the default model in float32 with DKM on every decoder linear, trained
`--steps` steps (AdamW) on random tokens, and reports the process's peak resident memory, the median step
time and, for eDKM, the bytes the DKM maps would have held against those it holds (`SavedMapCompression`
figures, summed over the 42 matrices of the last step). Arms: `dkm` (plain), `dkm-bf16` (DKM on the
weights' bfloat16 values, no compression: what eDKM computes) and `edkm` (the same with the compression).

The children run with glibc's `MALLOC_MMAP_THRESHOLD_` fixed at 1 MiB, so that every large tensor is its
own mapping, returned when freed: otherwise glibc raises the threshold to the size of the maps once one is
freed, serves the next ones from its heap, and the peak resident memory measures the heap's fragmentation
rather than what is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def arm(name: str, bits: int, batch: int, seq_len: int, steps: int) -> dict:
    import torch

    from effllm.compress.dkm import DKMWeight, apply_dkm
    from effllm.models import load_model
    from effllm.models.default import default_model_path

    torch.manual_seed(0)
    model = load_model(default_model_path(), dtype=torch.float32, device="cpu").train()
    apply_dkm(model, bits, edkm=name == "edkm")
    if name == "dkm-bf16":  # the same values eDKM clusters, without its compression
        for m in model.modules():
            if isinstance(m, DKMWeight):
                m.edkm, m.compress_saved = True, False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    result = {
        "arm": name,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),
        "rss_before_mb": round(before / 1e6, 1),
        "median_step_s": round(statistics.median(times), 2),
    }
    stats = [m.last_saved for m in model.modules() if isinstance(m, DKMWeight) and m.last_saved]
    if stats:
        result["dkm_saved_mb"] = round(sum(s.saved_bytes for s in stats) / 1e6, 1)
        result["dkm_stored_mb"] = round(sum(s.stored_bytes for s in stats) / 1e6, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # one arm, in a child process
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.bits, args.batch, args.seq_len, args.steps)))
        return
    rows = []
    for name in ("dkm", "dkm-bf16", "edkm"):
        argv = [sys.executable, __file__, "--arm", name, "--bits", str(args.bits), "--batch", str(args.batch)]
        argv += ["--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{args.bits}-bit DKM, default model (float32), batch {args.batch} x {args.seq_len}, {args.steps} steps"
    )
    print("| arm | peak RSS (MB) | median step (s) | DKM maps saved / stored (MB) |\n|---|---|---|---|")
    for r in rows:
        maps = f"{r['dkm_saved_mb']} / {r['dkm_stored_mb']}" if "dkm_saved_mb" in r else "-"
        print(f"| {r['arm']} | {r['peak_rss_mb']} | {r['median_step_s']} | {maps} |")


if __name__ == "__main__":
    main()
