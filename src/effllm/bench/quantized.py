"""`effllm bench quantized`: the same random weights dense and quantized, measured side by side.

For each variant (`fp32`, `bf16`, `w8a16`, `w8a8`, `w4a16`, `w4a8`, `pal4`, `pal3`) the benchmark loads the
one random checkpoint of `--shape` (or `--model`), quantizes it by round to nearest (bf16 dense layers and
scales; the method does not change the speed; w4a8 is QoQ's progressive grid in groups of `--group-size`,
as w4a16, without its data-driven steps) or palettizes it (`palN`: k-means, one N-bit palette per matrix,
bf16 palettes; the lookup-table kernel), and measures batch-1 prefill and decode (greedy, EOS ignored) and, with
`--throughput-requests N`, offline throughput of N requests. Speed ratios against bf16 and fp32 come from
the same run; the roofline share uses the variant's actual weight bytes and a bandwidth measured in the run.
"""

from __future__ import annotations

import argparse
import json

import torch

from effllm.analyze.hardware import measure_hardware
from effllm.bench.generate import _effllm_run, _measure
from effllm.bench.shapes import add_engine_args, add_model_args, bench_checkpoint, engine_args
from effllm.bench.throughput import random_prompts, run_effllm
from effllm.compress.sizes import streamed_bytes
from effllm.core.errors import InputError
from effllm.engine.config import EngineConfig
from effllm.engine.llm_engine import LLMEngine
from effllm.models import load_model

VARIANTS = ("fp32", "bf16", "w8a16", "w8a8", "w4a16", "w4a8", "pal4", "pal3")
PALETTES = {"pal4": 4, "pal3": 3}  # variant -> index bits
NO_PREFIX_CACHING = {"enable_prefix_caching": False}


def build_variant(path: str, variant: str, group_size: int, skip: list[str]):
    from effllm.compress import SCHEMES, quantize_

    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model = load_model(path, dtype=dtype, device="cpu")
    if variant in SCHEMES:
        options = {"group_size": group_size} if variant == "w4a16" else {}
        if variant == "w4a8":  # the grid only: rotation, smoothing and GPTQ change the values, not the speed
            options = dict(group_size=group_size, method="rtn", rotate=False, smooth_linear=False)
        quantize_(model, SCHEMES[variant](skip=skip, **options), show_progress=False)
    elif variant in PALETTES:
        from effllm.compress.palettize import palettize_

        palettize_(model, PALETTES[variant], skip=skip, show_progress=False)
    return model


GGUF_PEER = {"bf16": "BF16", "w8a16": "Q8_0", "w4a16": "Q4_0"}  # variant -> the GGUF llama.cpp runs


def _llama_cpp(model, path, variant, peer_python, prompt_tokens, new_tokens, reps) -> dict:
    """llama.cpp on the same weights: this variant's own codes written as GGUF blocks (bf16: llama.cpp's bf16)."""
    import tempfile

    from effllm.bench.peers.run import PEERS, run_peer_script
    from effllm.compress.gguf_export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        file = f"{tmp}/model.gguf"
        export_gguf(model, None, file)
        result = run_peer_script(
            PEERS["llama.cpp"],
            peer_python,
            path,
            "bfloat16",
            prompt_tokens,
            new_tokens,
            reps,
            extra_args=("--gguf", file),
        )
    result["gguf_type"] = GGUF_PEER[variant]
    return result


def run_quantized_bench(
    model_path: str | None = None,
    shape: str = "smollm-135m",
    variants: tuple[str, ...] = VARIANTS,
    group_size: int = 32,
    skip: list[str] | None = None,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    reps: int = 1,
    throughput_requests: int = 0,
    peer_python: str | None = None,
    **engine_options,
) -> dict:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise InputError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    skip = ["lm_head"] if skip is None else skip
    bandwidth = measure_hardware(copy_mib=512, matmul_n=256, repeats=3).bandwidth
    options = {**NO_PREFIX_CACHING, **engine_options}
    result = {
        "model": model_path or shape,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "group_size": group_size,
        "skip": skip,
        "threads": torch.get_num_threads(),
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "variants": {},
    }
    with bench_checkpoint(model_path, shape, "float32") as (path, _):
        for variant in variants:
            model = build_variant(path, variant, group_size, skip)
            vocab = model.config.vocab_size
            prompt = torch.randint(
                0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(1)
            ).tolist()
            engine = LLMEngine(model, config=EngineConfig(**options))
            r = _measure(_effllm_run, engine, prompt, new_tokens, reps)
            del engine
            r["streamed_bytes_per_token"] = streamed_bytes(model)
            r["decode_fraction_of_roofline"] = round(
                r["decode_tokens_per_s"] * r["streamed_bytes_per_token"] / bandwidth, 3
            )
            if throughput_requests:
                prompts = random_prompts(throughput_requests, 128, 512, vocab)
                r["throughput"] = run_effllm(model, prompts, new_tokens, **options)
            if peer_python and variant in GGUF_PEER:
                r["llama.cpp"] = _llama_cpp(
                    model, path, variant, peer_python, prompt_tokens, new_tokens, reps
                )
                for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                    r[f"{key.split('_')[0]}_speedup_vs_llama.cpp"] = round(r[key] / r["llama.cpp"][key], 3)
            result["variants"][variant] = r
            del model
    base = result["variants"]
    for variant, r in base.items():
        for ref in ("bf16", "fp32"):
            if ref in base and ref != variant:
                for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                    r[f"{key.split('_')[0]}_speedup_vs_{ref}"] = round(r[key] / base[ref][key], 3)
                if throughput_requests:
                    r[f"throughput_speedup_vs_{ref}"] = round(
                        r["throughput"]["output_tokens_per_s"]
                        / base[ref]["throughput"]["output_tokens_per_s"],
                        3,
                    )
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--group-size", type=int, default=32, choices=[32, 64, 128], help="w4a16 and w4a8 group size"
    )
    parser.add_argument("--skip", default="lm_head", help="linears left dense (comma-separated; '' for none)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument(
        "--throughput-requests",
        type=int,
        default=0,
        help="also measure offline throughput of this many requests (prompts 128-512 tokens)",
    )
    parser.add_argument(
        "--peer-python",
        default=None,
        help="python of a llama.cpp venv (scripts/peers/): also time llama.cpp on the same codes "
        "(bf16 as BF16, w8a16 as Q8_0, w4a16 g32 as Q4_0)",
    )
    add_engine_args(parser, defaults=NO_PREFIX_CACHING)
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_quantized_bench(
        args.model,
        args.shape,
        [v.strip() for v in args.variants.split(",") if v.strip()],
        args.group_size,
        [s for s in args.skip.split(",") if s],
        args.prompt_tokens,
        args.new_tokens,
        args.reps,
        args.throughput_requests,
        args.peer_python,
        **engine_args(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']}, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"{result['threads']} threads, {result['bandwidth_gb_s']} GB/s"
    )
    for name, r in result["variants"].items():
        line = (
            f"  {name:6s} prefill {r['prefill_tokens_per_s']:8.1f} tok/s  decode {r['decode_tokens_per_s']:6.1f} tok/s "
            f"({r['decode_fraction_of_roofline']:.0%} of roofline, {r['streamed_bytes_per_token'] / 1e6:.0f} MB/token)"
        )
        if "decode_speedup_vs_bf16" in r:
            line += f"  decode x{r['decode_speedup_vs_bf16']:.2f} bf16"
        if "decode_speedup_vs_fp32" in r:
            line += f" x{r['decode_speedup_vs_fp32']:.2f} fp32"
        if "llama.cpp" in r:
            line += (
                f"  llama.cpp {r['llama.cpp']['gguf_type']} decode {r['llama.cpp']['decode_tokens_per_s']:.1f} "
                f"(x{r['decode_speedup_vs_llama.cpp']:.2f})"
            )
        if "throughput" in r:
            line += f"  throughput {r['throughput']['output_tokens_per_s']:.1f} out tok/s"
        print(line)
    return 0
