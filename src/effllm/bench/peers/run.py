"""Running a peer's script in its own venv and reading the one JSON object it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from effllm.core.errors import ConfigError

# name -> the script (in this folder) that measures it; transformers runs in-process (bench/generate.py).
PEERS = {"transformers": None, "llama.cpp": "llama_cpp_runner.py", "vllm": "vllm_runner.py"}


def peer_python(spec: str | None, name: str) -> str | None:
    """The python to run peer `name` with, from `--peer-python`: one PATH for every peer, or
    NAME=PATH pairs separated by commas (e.g. llama.cpp=.peers/llama.cpp/bin/python,vllm=.peers/vllm/bin/python)."""
    if not spec or "=" not in spec:
        return spec
    pairs = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
    unknown = sorted(set(pairs) - set(PEERS))
    if unknown:
        raise ConfigError(f"--peer-python names {unknown[0]!r}, which is not a peer ({', '.join(PEERS)})")
    return pairs.get(name)


def run_peer_script(
    script: str,
    python: str | None,
    model: str,
    dtype: str,
    prompt_tokens: int,
    new_tokens: int,
    reps: int,
    timeout: float = 1800,
    extra_args: tuple[str, ...] = (),
) -> dict:
    """A peer's measurement on the HF folder `model` (batch-1 prefill/decode, or what `extra_args` ask
    for), by its script run with `python`."""
    cmd = [
        python or sys.executable,
        str(Path(__file__).parent / script),
        "--model",
        model,
        "--dtype",
        dtype,
        "--prompt-tokens",
        str(prompt_tokens),
        "--new-tokens",
        str(new_tokens),
        "--reps",
        str(reps),
        "--threads",
        str(torch.get_num_threads()),
        *extra_args,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ConfigError(
            f"--peer-python {python} does not exist; install the peer with scripts/peers/"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"the {script} peer failed ({last}); is it installed in --peer-python's venv? See scripts/peers/"
        )
    # The last line that is a JSON object: a peer's own subprocesses may log to stdout after it (vLLM's do).
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ConfigError(f"the {script} peer printed no JSON result; run it by hand to see why")
