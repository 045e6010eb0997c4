"""`effllm bench generate`: batch-1 prefill and decode speed of effllm's engine beside transformers' `generate`.

Both run the same weights in the same process, one after the other, with a warm-up each. Prefill speed
is prompt tokens over the time to the first token; decode speed is the later tokens over the time
between the first and the last token (per-step timestamps, as in the CPU baseline study).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from effllm.analyze.hardware import Hardware, get_hardware, measure_hardware
from effllm.analyze.roofline import roofline_fraction
from effllm.bench.peers.run import PEERS, peer_python, run_peer_script
from effllm.bench.shapes import add_engine_args, add_model_args, bench_checkpoint, engine_args
from effllm.core.errors import ConfigError
from effllm.engine import EngineConfig, LLMEngine, SamplingParams
from effllm.models import load_model

NO_PREFIX_CACHING = {"enable_prefix_caching": False}


def _effllm_run(engine: LLMEngine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    # Greedy, as the peers decode: sampling would add a softmax and a draw over the vocabulary per token.
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    stamps = []
    start = time.perf_counter()
    engine.add_request(f"bench-{start}", {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        if engine.step():
            stamps.append(time.perf_counter())
    return stamps[0] - start, stamps[-1] - stamps[0]


def _hf_run(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([prompt])
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([Stamp()]),
        pad_token_id=0,
    )
    return stamps[0] - start, stamps[-1] - stamps[0]


def _measure(run, model, prompt, new_tokens, reps) -> dict:
    # Warm-up on the whole prompt: with a 16-token one, the first two 512-token fp32 prefills of a bench
    # quantized run measured 384 and 475 tok/s, then 821; now only the first (407, then 811 and 830), so the
    # median of 3 is the steady speed.
    run(model, prompt, 4)
    prefill, decode = [], []
    for _ in range(reps):
        ttft, rest = run(model, prompt, new_tokens)
        prefill.append(len(prompt) / ttft)
        decode.append((new_tokens - 1) / rest)
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "prefill_runs": [round(x, 2) for x in prefill],
        "decode_runs": [round(x, 2) for x in decode],
    }


def _roofline_fractions(result: dict, config, hardware: Hardware, bits: int) -> None:
    """Add each engine's measured speed as a fraction of the roofline (decode at the mean context)."""
    p, n = result["prompt_tokens"], result["new_tokens"]
    for name in ("effllm", *PEERS):
        if name in result:
            r = result[name]
            r["prefill_fraction_of_roofline"] = roofline_fraction(
                config, hardware, "prefill", 1, p, r["prefill_tokens_per_s"], bits, bits
            )
            r["decode_fraction_of_roofline"] = roofline_fraction(
                config, hardware, "decode", 1, p + n // 2, r["decode_tokens_per_s"], bits, bits
            )


def run_generate_bench(
    model_path: str | None = None,
    shape: str = "smollm-135m",
    dtype: str = "float32",
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    reps: int = 3,
    peers: bool | list[str] = True,
    hardware: str | Hardware | None = None,
    peer_pythons: str | None = None,
    **engine_options,
) -> dict:
    """Measure effllm and its peers side by side; `hardware` None measures this machine in the run.

    peers: True for transformers, False for none, or names from PEERS; a peer other than transformers runs
    its script (bench/peers/) with the python of the venv it was installed in (`peer_pythons`: one path, or
    NAME=PATH pairs).
    """
    peers = ["transformers"] if peers is True else list(peers or [])
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ConfigError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    hw = get_hardware(hardware) if hardware is not None else measure_hardware(copy_mib=512, repeats=3)
    # Every rep sends the same prompt: with prefix caching on, later reps would skip the prefill.
    options = {**NO_PREFIX_CACHING, **engine_options}
    torch.manual_seed(0)
    with bench_checkpoint(model_path, shape, dtype) as (model_path, label):
        model = load_model(model_path, dtype=dtype, device=engine_options.get("device") or "cpu")
        config = model.config
        vocab = config.vocab_size
        prompt = torch.randint(
            0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(1)
        ).tolist()
        result = {
            "model": label,
            "dtype": dtype,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "batch": 1,
            "threads": torch.get_num_threads(),
            "effllm": _measure(
                _effllm_run, LLMEngine(model, config=EngineConfig(**options)), prompt, new_tokens, reps
            ),
        }
        del model
        for name in peers:
            if name != "transformers":
                python = peer_python(peer_pythons, name)
                result[name] = run_peer_script(
                    PEERS[name], python, model_path, dtype, prompt_tokens, new_tokens, reps
                )
                for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                    result[f"{key.split('_')[0]}_speedup_vs_{name}"] = round(
                        result["effllm"][key] / result[name][key], 3
                    )
        if "transformers" in peers:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
            ).eval()
            with torch.inference_mode():
                result["transformers"] = _measure(_hf_run, hf, prompt, new_tokens, reps)
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                result[f"{key.split('_')[0]}_speedup_vs_transformers"] = round(
                    result["effllm"][key] / result["transformers"][key], 3
                )
    _roofline_fractions(result, config, hw, torch.finfo(getattr(torch, dtype)).bits)
    result["hardware"] = hw.to_dict()
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="measure effllm alone")
    parser.add_argument(
        "--peers",
        default="transformers",
        help=f"comma-separated peers to run beside effllm: {', '.join(PEERS)} (default transformers)",
    )
    parser.add_argument(
        "--peer-python",
        default=None,
        help="the python of the venv a non-transformers peer is installed in (scripts/peers/): one PATH, or "
        "NAME=PATH pairs separated by commas",
    )
    parser.add_argument(
        "--hardware",
        default=None,
        help="roofline hardware (name or .json; default: measure this machine in the same run)",
    )
    add_engine_args(parser, defaults=NO_PREFIX_CACHING)
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_generate_bench(
        args.model,
        args.shape,
        args.dtype,
        args.prompt_tokens,
        args.new_tokens,
        args.reps,
        [] if args.no_peers else [p.strip() for p in args.peers.split(",") if p.strip()],
        args.hardware,
        args.peer_python,
        **engine_args(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']} {args.dtype}, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens"
    )
    for name in ("effllm", *PEERS):
        if name in result:
            r = result[name]
            print(
                f"  {name:13s} prefill {r['prefill_tokens_per_s']:8.1f} tok/s "
                f"({r['prefill_fraction_of_roofline']:.0%} of roofline)   decode {r['decode_tokens_per_s']:6.1f} tok/s "
                f"({r['decode_fraction_of_roofline']:.0%} of roofline)"
            )
    return 0
