"""`effllm bench serve`: an online load test of an OpenAI-compatible server, as vLLM's `bench serve` runs it.

Requests arrive as a Poisson process at each `--request-rate` (inf sends them all at once), at most
`--max-concurrency` in flight; each streams a completion of `--input-len` prompt tokens and exactly
`--output-len` new ones (ignore_eos). Reported per rate, in vLLM's names: request and token throughput,
and the mean, median and p99 of TTFT (time to first token), TPOT (time per output token after the
first, (latency - TTFT) / (output tokens - 1)), ITL (time between streamed chunks) and E2EL (end-to-end
latency), in milliseconds. With no --base-url it starts `effllm serve` on a free loopback port itself
(a subprocess, so that the load generator does not share the server's interpreter).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np

from effllm.core.errors import ConfigError, InputError

_WORDS = (  # words for random prompts
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "had",
    "not",
    "but",
    "have",
    "one",
    "their",
    "all",
    "they",
    "its",
    "new",
    "more",
    "after",
    "first",
    "two",
    "time",
    "other",
    "some",
    "would",
    "when",
    "people",
    "into",
    "only",
    "over",
    "years",
    "also",
    "made",
    "city",
    "may",
    "state",
    "about",
    "during",
    "school",
    "world",
    "between",
    "three",
)
START_TIMEOUT = 300.0


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# ---------------------------------------------------------------- one request


async def _send(client: httpx.AsyncClient, body: dict) -> RequestResult:
    """Stream one completion, stamping each chunk that carries text."""
    result, start, last = RequestResult(), time.perf_counter(), None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk, now = json.loads(line[6:]), time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = last is not None and result.output_tokens > 0
    if not result.ok:
        result.error = "the stream carried no text or no usage"
    return result


# ---------------------------------------------------------------- one rate


async def _run_rate(
    client: httpx.AsyncClient, bodies: list[dict], rate: float, max_concurrency: int | None, seed: int
) -> tuple[list[RequestResult], float]:
    """Send `bodies` with Poisson arrivals at `rate` per second; returns the results and the duration."""
    limit = asyncio.Semaphore(max_concurrency or len(bodies))
    gaps = random.Random(seed)

    async def limited(body: dict) -> RequestResult:
        async with limit:
            return await _send(client, body)

    start, tasks = time.perf_counter(), []
    for body in bodies:
        tasks.append(asyncio.create_task(limited(body)))
        if math.isfinite(rate):
            await asyncio.sleep(gaps.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vLLM's serving metrics over the completed requests (latencies in ms)."""
    done = [r for r in results if r.ok]
    inputs, outputs = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    out = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput": len(done) / duration,
        "output_throughput": outputs / duration,
        "total_token_throughput": (inputs + outputs) / duration,
    }
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    for name, values in samples.items():
        ms = np.array(values or [math.nan]) * 1000
        out[f"mean_{name}_ms"] = float(ms.mean())
        out[f"median_{name}_ms"] = float(np.median(ms))
        out[f"p99_{name}_ms"] = float(np.percentile(ms, 99))
    errors = collections.Counter(r.error for r in results if not r.ok)
    if errors:
        out["errors"] = dict(errors.most_common(5))
    return out


# ---------------------------------------------------------------- prompts


async def _bodies(
    client: httpx.AsyncClient, model: str, num: int, input_len: int, output_len: int, seed: int
) -> tuple[list[dict], str]:
    """Request bodies: random windows of `input_len` token ids of random text (the server's /tokenize),
    or, where the server has no /tokenize, `input_len` random words."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(_WORDS) for _ in range(max(4 * input_len, 256)))
    prompts: list = []
    r = await client.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
    if r.status_code == 200 and len(r.json().get("tokens", [])) > input_len:
        ids, kind = r.json()["tokens"], "token_ids"
        for _ in range(num):
            start = rng.randrange(len(ids) - input_len)
            prompts.append(ids[start : start + input_len])
    else:
        kind = "words"
        prompts = [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(num)]
    body = {
        "model": model,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return [{**body, "prompt": p} for p in prompts], kind


# ---------------------------------------------------------------- the server


@contextmanager
def launched_server(
    model: str, server_args: Sequence[str] = (), timeout: float = START_TIMEOUT
) -> Iterator[str]:
    """`effllm serve --model MODEL` on a free loopback port in a subprocess; yields its URL, then stops it."""
    cmd = [
        sys.executable,
        "-m",
        "effllm.cli.serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *server_args,
    ]
    # The log is read to its end (a full pipe would stall the server): the port line, and a tail for errors.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail: collections.deque[str] = collections.deque(maxlen=50)
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            tail.append(line)
            match = re.search(r"serving on (http://\S+:\d+)", line)
            if match and not found.is_set():
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"effllm serve did not start:\n{''.join(tail)}")
        yield url[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---------------------------------------------------------------- the benchmark


def run_serve_bench(
    base_url: str | None = None,
    *,
    model: str | None = None,
    request_rates: Sequence[float] = (math.inf,),
    max_concurrency: int | None = None,
    num_prompts: int = 64,
    input_len: int = 128,
    output_len: int = 64,
    seed: int = 0,
    api_key: str | None = None,
    served_model_name: str | None = None,
    server_args: Sequence[str] = (),
    timeout: float = 600.0,
) -> dict:
    """Load-test `base_url` (or an `effllm serve --model MODEL` it starts) at each rate; vLLM's metrics."""
    _check(request_rates, max_concurrency, num_prompts, input_len, output_len, timeout)
    if base_url is not None:
        return asyncio.run(
            _bench(
                base_url,
                request_rates,
                max_concurrency,
                num_prompts,
                input_len,
                output_len,
                seed,
                api_key,
                served_model_name,
                timeout,
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        model = model or _default_model(tmp)
        with launched_server(model, server_args) as url:
            result = asyncio.run(
                _bench(
                    url,
                    request_rates,
                    max_concurrency,
                    num_prompts,
                    input_len,
                    output_len,
                    seed,
                    api_key,
                    served_model_name,
                    timeout,
                )
            )
    result["server"] = {"launched": True, "model": model, "server_args": list(server_args)}
    return result


async def _bench(
    base_url: str,
    rates: Sequence[float],
    max_concurrency: int | None,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int,
    api_key: str | None,
    model: str | None,
    timeout: float,
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or num_prompts, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        bodies, kind = await _bodies(client, model, num_prompts, input_len, output_len, seed)
        warm = await _send(client, {**bodies[0], "max_tokens": 2})
        if not warm.ok:
            raise ConfigError(f"the warm-up request to {base_url} failed: {warm.error}")
        runs = []
        for i, rate in enumerate(rates):
            results, duration = await asyncio.wait_for(
                _run_rate(client, bodies, rate, max_concurrency, seed + i), timeout
            )
            runs.append(
                {
                    "request_rate": rate if math.isfinite(rate) else "inf",
                    "max_concurrency": max_concurrency,
                    **summarize(results, duration),
                }
            )
    return {
        "base_url": base_url,
        "model": model,
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "prompt_kind": kind,
        "seed": seed,
        "results": runs,
        "server": {"launched": False},
    }


def _default_model(tmp: str) -> str:
    """The embedded default model, or else a random `init-model --preset small` (speed only: noise text)."""
    from effllm.cli.init_model import init_model
    from effllm.core.errors import CheckpointError
    from effllm.models.default import default_model_path

    try:
        return str(default_model_path())
    except CheckpointError:
        return str(init_model(f"{tmp}/random-small", preset="small"))


def _check(
    rates: Sequence[float],
    max_concurrency: int | None,
    num_prompts: int,
    input_len: int,
    output_len: int,
    timeout: float,
) -> None:
    if not rates or any(not rate > 0 for rate in rates):
        raise InputError(f"request rates must be positive (inf = all at once), got {list(rates)}")
    if max_concurrency is not None and max_concurrency < 1:
        raise InputError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    for name, value in (("num-prompts", num_prompts), ("input-len", input_len), ("output-len", output_len)):
        if value < 1:
            raise InputError(f"--{name} must be at least 1, got {value}")
    if not timeout > 0:
        raise InputError(f"--timeout must be positive, got {timeout}")


# ---------------------------------------------------------------- CLI


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=None,
        help="server to load, e.g. http://127.0.0.1:8000 (default: start effllm serve on loopback)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint for the server it starts (default: the embedded default model, else a "
        "random init-model small)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="'model' to request (default: the first listed)"
    )
    parser.add_argument("--api-key", default=None, help="Bearer key for the server")
    parser.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests per second, Poisson arrivals; several run one after another (default inf)",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: all)"
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per rate (default 64)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--output-len", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-args",
        default="",
        help="extra flags for the effllm serve it starts, e.g. '--max-num-seqs 32'",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per rate (default 600)")
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_serve_bench(
        args.base_url,
        model=args.model,
        request_rates=args.request_rate,
        max_concurrency=args.max_concurrency,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        server_args=shlex.split(args.server_args),
        timeout=args.timeout,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']} at {result['base_url']}: {result['num_prompts']} requests of {result['input_len']} "
        f"prompt + {result['output_len']} output tokens"
    )
    for run in result["results"]:
        print(
            f"  rate {run['request_rate']} req/s, concurrency {run['max_concurrency'] or 'unbounded'}: "
            f"{run['completed']} done, {run['failed']} failed in {run['duration_s']:.2f} s; "
            f"{run['request_throughput']:.2f} req/s, {run['output_throughput']:.1f} output tok/s"
        )
        for name in ("ttft", "tpot", "itl", "e2el"):
            print(
                f"    {name.upper():5s} mean {run[f'mean_{name}_ms']:9.2f} ms  median {run[f'median_{name}_ms']:9.2f}"
                f" ms  p99 {run[f'p99_{name}_ms']:9.2f} ms"
            )
    return 0
