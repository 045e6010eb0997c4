"""`effllm serve` in a subprocess: SIGTERM lets in-flight requests finish or aborts them, then exits 0."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from effllm.cli.serve import build_parser, engine_options, main
from effllm.serve.app import build_app
from tests.serve.conftest import MODEL_NAME, running_server

START_TIMEOUT = 120


def start_server(model_dir: str, *flags: str) -> tuple[subprocess.Popen, str, queue.Queue]:
    """`python -m effllm.cli.serve` on a free port; returns the process, its URL and its log lines."""
    cmd = [
        sys.executable,
        "-m",
        "effllm.cli.serve",
        "--model",
        model_dir,
        "--port",
        "0",
        "--device",
        "cpu",
        "--num-kv-blocks",
        "256",
        "--max-model-len",
        "1024",
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}") from None
            continue
        match = re.search(r"serving on (http://\S+):(\d+)", line)
        if match:
            return proc, f"{match.group(1)}:{match.group(2)}", lines
    proc.kill()
    raise RuntimeError("the server did not start in time")


def log_text(lines: queue.Queue) -> str:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return "".join(out)


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_0(model_dir):
    proc, url, lines = start_server(model_dir, "--shutdown-timeout", "20")
    streaming, events = threading.Event(), []
    try:

        def stream() -> None:
            body = {"prompt": "go", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        client = threading.Thread(target=stream)
        client.start()
        assert streaming.wait(30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        client.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert re.search(r"POST /v1/completions 200 prompt_tokens=\d+ completion_tokens=200 ", log_text(lines))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_shutdown_aborts_streams_still_running_after_the_timeout(slow_engine):
    app = build_app(slow_engine, served_model_names=MODEL_NAME)
    events, streaming = [], threading.Event()
    with running_server(app, shutdown_timeout=0.3, on_shutdown_timeout=app.state.engine.abort_all) as url:

        def stream() -> None:
            body = {"prompt": "long", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        client = threading.Thread(target=stream)
        client.start()
        assert streaming.wait(30)
    client.join(10)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "unavailable"
    assert slow_engine.block_manager.usage == 0 and not slow_engine.has_unfinished_requests()


def test_sigint_on_an_idle_server_exits_0(model_dir):
    proc, url, _ = start_server(model_dir)
    try:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == model_dir
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_flags_include_the_engine_options():
    args = build_parser().parse_args(
        [
            "--model",
            "m",
            "--max-num-seqs",
            "4",
            "--no-enable-prefix-caching",
            "--kv-cache-memory",
            "1GiB",
            "--api-key",
            "k",
            "--max-queue",
            "3",
        ]
    )
    assert engine_options(args) == {
        "max_num_seqs": 4,
        "enable_prefix_caching": False,
        "kv_cache_memory": "1GiB",
    }
    assert (args.host, args.port, args.api_key, args.max_queue) == ("127.0.0.1", 8000, "k", 3)


def test_bad_flags_exit_2_with_one_line(model_dir, capsys):
    assert main(["--model", model_dir, "--port", "70000"]) == 2
    assert capsys.readouterr().err == "effllm: error: --port must be in 0..65535, got 70000\n"
    assert main(["--model", model_dir, "--max-queue", "-1"]) == 2
    assert main(["--model", str(model_dir) + "-missing"]) == 2


def stream_until_cut(url: str, events: list, streaming: threading.Event, max_tokens: int = 1000) -> None:
    body = {"prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    streaming.set()
    except httpx.HTTPError as e:
        events.append(f"cut: {type(e).__name__}")


def test_a_second_sigint_aborts_streams_properly_and_exits_0(model_dir):
    proc, url, lines = start_server(model_dir, "--shutdown-timeout", "30")
    events, streaming = [], threading.Event()
    try:
        client = threading.Thread(target=stream_until_cut, args=(url, events, streaming))
        client.start()
        assert streaming.wait(30)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        client.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "data: [DONE]", events[-2:]
    assert json.loads(events[-2][6:])["error"]["code"] == "unavailable"


def test_two_quick_sigints_on_an_idle_server_exit_0(model_dir):
    proc, _, _ = start_server(model_dir)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


def test_clients_that_leave_early_are_logged_as_499_with_what_they_used(model_dir):
    import socket

    proc, url, lines = start_server(model_dir)
    try:
        for _ in range(3):
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                timeout=60,
                json={"prompt": "go", "max_tokens": 500, "ignore_eos": True, "stream": True},
            ) as r:
                for i, _line in enumerate(r.iter_lines()):
                    if i > 3:
                        break
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:  # hangs up in the middle of its body
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"prompt": "hel'
            )
            time.sleep(0.3)
        time.sleep(1.0)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log = log_text(lines)
    streamed = re.findall(r"POST /v1/completions 499 prompt_tokens=(\d+) completion_tokens=(\d+)", log)
    assert len(streamed) == 3 and all(int(c) > 0 for _, c in streamed)
    assert re.search(r"POST /v1/completions 499 \d", log)  # the hang-up: 499, no token counts
    assert "Traceback" not in log and " 500 " not in log
