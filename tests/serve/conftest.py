"""A tiny served model, engines over it, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from effllm.cli.init_model import init_model
from effllm.engine.llm_engine import LLMEngine, make_engine
from effllm.engine.outputs import RequestOutput
from effllm.engine.sampling_params import SamplingParams
from effllm.models import load_model, save_model
from effllm.serve.server import make_server

MODEL_NAME = "tiny"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """init-model's tiny llama, its head made to prefer printable ASCII by a wide margin: greedy text is
    readable (stop strings are easy to pick) and never flips between batched and single runs. It never
    emits EOS, so every generation runs to max_tokens."""
    path = init_model(tmp_path_factory.mktemp("serve") / "tiny", seed=0)
    model = load_model(path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        printable = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0
        model.lm_head.weight[printable] *= 20
    save_model(model, path)
    return str(path)


def new_engine(model_dir: str, **options) -> LLMEngine:
    options = {"num_kv_blocks": 256, "max_model_len": MAX_MODEL_LEN, "device": "cpu", **options}
    return make_engine(model_dir, **options)


@pytest.fixture(scope="session")
def engine(model_dir) -> LLMEngine:
    """One engine for the tests that need no special options (one app drives it at a time)."""
    return new_engine(model_dir)


@pytest.fixture()
def slow_engine(engine, monkeypatch) -> LLMEngine:
    """The shared engine with each step taking at least 5 ms, so long requests outlast short timeouts
    on any machine."""
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.005) or step())
    return engine


def generate_offline(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> list[RequestOutput]:
    """The engine's final outputs for `prompts`, stepping it directly (no server may be running on it)."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"offline-{i}", {"prompt_token_ids": ids}, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return [finals[f"offline-{i}"] for i in range(len(prompts))]


@contextlib.contextmanager
def running_server(
    app, timeout: float = 30.0, shutdown_timeout: float = 5, on_shutdown_timeout=None
) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    server = make_server(
        app,
        "127.0.0.1",
        0,
        shutdown_timeout=shutdown_timeout,
        on_shutdown_timeout=on_shutdown_timeout,
        log_level="warning",
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
