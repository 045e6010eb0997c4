"""Running a peer's script in its own venv and reading the one JSON object it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from effllm.core.errors import ConfigError

# name -> the script (in this folder) that measures it; transformers runs in-process (bench/generate.py).
PEERS = {"transformers": None, "llama.cpp": "llama_cpp_runner.py"}


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
    """Batch-1 prefill/decode of a peer on the HF folder `model`, by its script run with `python`."""
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
    return json.loads(done.stdout.strip().splitlines()[-1])
