"""Many concurrent streams, clients that go away, a full queue: over a real loopback server."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import pytest

from effllm.engine.sampling_params import SamplingParams
from effllm.serve.app import build_app
from tests.serve.conftest import MODEL_NAME, generate_offline, new_engine, running_server

NUM_CLIENTS = 64
MAX_TOKENS = 16


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    wanted = {"model_name": MODEL_NAME, **labels}
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == wanted:
            return float(m.group(2))
    return 0.0


def wait_for_metric(base_url: str, name: str, value: float, timeout: float = 20, **labels: str) -> str:
    """Poll /metrics until the sample has `value` (the engine thread applies aborts asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{base_url}/metrics").text
        if metric(text, name, **labels) == value or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, list]:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, events = "", []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                text += "".join(c["text"] for c in events[-1]["choices"])
    return text, events


def test_64_concurrent_streams_all_complete_with_the_greedy_text(model_dir):
    engine = new_engine(model_dir)
    prompts = [f"Client {i} says" for i in range(NUM_CLIENTS)]
    expected = [
        out.text
        for out in generate_offline(
            engine,
            [engine.tokenizer.encode(p) for p in prompts],
            SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
        )
    ]

    async def main(base_url: str) -> list[tuple[str, list]]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(stream_completion(client, p, MAX_TOKENS) for p in prompts)), 120
            )

    with running_server(build_app(engine, served_model_names=MODEL_NAME)) as url:
        results = asyncio.run(main(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert [text for text, _ in results] == expected
    assert all(events[-1]["usage"]["completion_tokens"] == MAX_TOKENS for _, events in results)
    assert metric(metrics, "effllm:request_success_total", finished_reason="length") == NUM_CLIENTS
    assert metric(metrics, "effllm:generation_tokens_total") == NUM_CLIENTS * MAX_TOKENS
    assert metric(metrics, "effllm:time_to_first_token_seconds_count") == NUM_CLIENTS
    assert metric(metrics, "effllm:kv_cache_usage_perc") == 0
    assert metric(metrics, "effllm:spec_decode_num_draft_tokens") == 0  # no speculation configured


def test_client_that_disconnects_mid_stream_frees_its_blocks(slow_engine):
    async def read_a_little_then_leave(base_url: str) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            body = {"prompt": "Go on and on", "max_tokens": 900, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                lines = 0
                async for line in r.aiter_lines():
                    lines += line.startswith("data: ")
                    if lines == 3:
                        break  # leaving the block closes the connection mid-stream

    with running_server(build_app(slow_engine, served_model_names=MODEL_NAME)) as url:
        asyncio.run(read_a_little_then_leave(url))
        text = wait_for_metric(url, "effllm:kv_cache_usage_perc", 0)
        assert metric(text, "effllm:kv_cache_usage_perc") == 0
        assert metric(text, "effllm:request_success_total", finished_reason="abort") == 1
        assert metric(text, "effllm:num_requests_running") == 0
        assert metric(text, "effllm:generation_tokens_total") < 900
        assert httpx.get(f"{url}/health").status_code == 200


def test_client_that_disconnects_while_waiting_for_a_whole_response_frees_its_blocks(slow_engine):
    body = {"prompt": "Go on", "max_tokens": 900, "ignore_eos": True}
    with running_server(build_app(slow_engine, served_model_names=MODEL_NAME)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.1))
        text = wait_for_metric(url, "effllm:kv_cache_usage_perc", 0)
        assert metric(text, "effllm:kv_cache_usage_perc") == 0
        assert metric(text, "effllm:request_success_total", finished_reason="abort") == 1
        assert metric(text, "effllm:generation_tokens_total") < 900


def test_requests_past_max_queue_get_429_and_the_others_finish(engine, monkeypatch):
    app = build_app(engine, served_model_names=MODEL_NAME, max_queue=1)
    gate, step = threading.Event(), engine.step
    monkeypatch.setattr(engine, "step", lambda: gate.wait(30) and step())  # the test decides when steps run

    async def until(condition, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def main(base_url: str) -> list[int]:
        body = {"prompt": "Wait", "max_tokens": 4}
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            queued = asyncio.create_task(client.post("/v1/completions", json=body))
            await until(lambda: len(engine.scheduler.waiting) == 1)  # submitted, no output yet
            rejected = await client.post("/v1/completions", json=body)
            assert rejected.json()["error"]["code"] == "queue_full"
            gate.set()
            first = await queued
            later = await client.post("/v1/completions", json=body)  # the queue has room again
            return [rejected.status_code, first.status_code, later.status_code]

    with running_server(app) as url:
        assert asyncio.run(main(url)) == [429, 200, 200]


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_aborts_the_request(slow_engine, stream):
    app = build_app(slow_engine, served_model_names=MODEL_NAME, request_timeout=0.1)
    body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": stream}
    with running_server(app) as url:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        if stream:
            assert r.status_code == 200
            errors = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith('data: {"error"')
            ]
            assert errors[0]["error"]["code"] == "timeout" and r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        text = wait_for_metric(url, "effllm:kv_cache_usage_perc", 0)
        assert metric(text, "effllm:kv_cache_usage_perc") == 0
        assert metric(text, "effllm:request_success_total", finished_reason="abort") == 1


def test_a_failing_engine_fails_its_requests_and_health(model_dir):
    engine = new_engine(model_dir, num_kv_blocks=32)

    def broken_step():
        raise RuntimeError("simulated engine failure")

    engine.step = broken_step
    with running_server(build_app(engine, served_model_names=MODEL_NAME)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert httpx.get(f"{url}/health").status_code == 503
        again = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert again.status_code == 503
