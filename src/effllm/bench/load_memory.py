"""Peak resident memory while loading a checkpoint, as a multiple of the checkpoint's size.

The loader must never hold two copies of the weights. A random checkpoint of a given shape is written,
then loaded in a fresh process that reports its peak RSS (VmHWM) before and after `load_model`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from effllm.bench.shapes import SHAPES, shape_config
from effllm.models import CausalLM, save_model

_CHILD = """
import json, sys, torch
from pathlib import Path
def hwm():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
    return 0
from effllm.models import load_model
before = hwm()
model = load_model(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] != 'auto' else None, device='cpu')
print(json.dumps({'rss_before': before, 'rss_peak': hwm()}))
"""


def run_load_memory(
    shape: str = "smollm-135m", save_dtype: str = "float32", load_dtype: str = "auto"
) -> dict:
    config = shape_config(shape)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = CausalLM(config).to(getattr(torch, save_dtype))
        save_model(model, Path(tmp) / "ckpt")
        del model
        size = sum(p.stat().st_size for p in (Path(tmp) / "ckpt").glob("*.safetensors"))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(Path(tmp) / "ckpt"), load_dtype],
            capture_output=True,
            text=True,
            check=True,
        )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    added = child["rss_peak"] - child["rss_before"]
    return {
        "shape": shape,
        "save_dtype": save_dtype,
        "load_dtype": load_dtype,
        "checkpoint_bytes": size,
        "rss_before_load": child["rss_before"],
        "rss_peak": child["rss_peak"],
        "load_added_bytes": added,
        "added_over_checkpoint": round(added / size, 3),
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="smollm-135m", choices=sorted(SHAPES), help="random model shape")
    parser.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--load-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_load_memory(args.shape, args.save_dtype, args.load_dtype)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mib = 1024**2
        print(
            f"checkpoint {result['checkpoint_bytes'] / mib:.0f} MiB ({args.shape}, {args.save_dtype}); "
            f"loading added {result['load_added_bytes'] / mib:.0f} MiB of peak RSS = "
            f"{result['added_over_checkpoint']:.2f}x the checkpoint"
        )
    return 0
