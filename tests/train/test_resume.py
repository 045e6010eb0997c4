import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effllm.train import train
from effllm.train.checkpointing import PAUSE_ENV, list_checkpoints
from effllm.train.metrics import read_metrics

STEPS = 8


def run_until_killed(config, kill_line: str, inside: Path | None, extra: list[str] = ()) -> None:
    """Run training in a subprocess (with `extra` flags); SIGKILL it once it has printed `kill_line` and
    written `inside` (when given)."""
    args = [
        sys.executable,
        "-m",
        "effllm.train",
        *(["--model-config", config.model_config] if config.model_config else []),
        "--tokenizer",
        config.tokenizer,
        "--data",
        *config.data,
        "--out",
        config.out,
        "--steps",
        str(config.steps),
        "--seq-len",
        str(config.seq_len),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(config.lr),
        "--eval-fraction",
        str(config.eval_fraction),
        "--save-every",
        str(config.save_every),
        "--keep-last",
        str(config.keep_last),
        "--no-tensorboard",
        "--log-every",
        "1",
        *extra,
    ]
    env = {**os.environ, PAUSE_ENV: "2", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == kill_line:
                deadline = time.monotonic() + 30
                while inside is not None and not inside.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                proc.send_signal(signal.SIGKILL)
                break
        else:
            tail = "".join(seen[-15:])
            pytest.fail(f"the run ended without printing {kill_line!r}; its output ended:\n{tail}")
    finally:
        proc.kill()
        proc.wait()


def assert_resumes_like(reference, killed, extra: list[str], kill_step: int = 4) -> None:
    """Run `killed` (the options of the already trained `reference`, plus keep_last=1) in a subprocess with
    the `extra` flags, kill it once checkpoint `kill_step` is saved, resume it, and check that every step's
    loss equals the uninterrupted run's."""
    expected = [row["loss"] for row in read_metrics(Path(reference.out) / "metrics.jsonl")]
    out = Path(killed.out)
    run_until_killed(
        killed, "checkpoint: saved " + str(out / "checkpoints" / f"step-{kill_step:08d}"), None, extra
    )
    killed.resume = True
    train(killed)
    assert [row["loss"] for row in read_metrics(out / "metrics.jsonl")] == pytest.approx(expected, abs=1e-6)


def test_resume_after_sigkill_mid_save_matches_an_uninterrupted_run(make_config):
    reference = make_config("reference", steps=STEPS, save_every=2)
    train(reference)
    expected = [row["loss"] for row in read_metrics(Path(reference.out) / "metrics.jsonl")]

    killed = make_config("killed", steps=STEPS, save_every=2, keep_last=1)
    out = Path(killed.out)
    # Killed while the save pauses between the weights and the optimizer state.
    run_until_killed(
        killed, "checkpoint: saving step 4", out / "checkpoints" / ".tmp-step-00000004" / "config.json"
    )
    assert [step for step, _ in list_checkpoints(out)] == [2]  # the half-written step 4 does not count
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / "checkpoints").iterdir())

    killed.resume = True
    train(killed)
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["loss"] for row in rows] == pytest.approx(expected, abs=1e-6)
    assert [step for step, _ in list_checkpoints(out)] == [STEPS]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_can_extend_a_finished_run(make_config):
    config = make_config(steps=4, save_every=2, schedule="constant")
    train(config)
    config.steps, config.resume = 6, True
    train(config)
    rows = read_metrics(Path(config.out) / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    straight = make_config("straight", steps=6, schedule="constant")
    train(straight)
    expected = [row["loss"] for row in read_metrics(Path(straight.out) / "metrics.jsonl")]
    assert [row["loss"] for row in rows] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("galore_adamw", {"rank": 8, "update_proj_gap": 3}),
        ("zo_sgd", {}),
        ("forward_grad_sgd", {}),
    ],
)
def test_resume_is_exact_with_optimizers_from_effllm_optim(make_config, optimizer, options):
    common = dict(optimizer=optimizer, optimizer_options=options, lr=1e-3, schedule="constant")
    straight = make_config("straight", steps=5, **common)
    train(straight)
    resumed = make_config("resumed", steps=3, save_every=3, **common)
    train(resumed)
    resumed.steps, resumed.resume = 5, True
    train(resumed)
    assert read_metrics(Path(resumed.out) / "metrics.jsonl") and [
        r["loss"] for r in read_metrics(Path(resumed.out) / "metrics.jsonl")
    ] == pytest.approx([r["loss"] for r in read_metrics(Path(straight.out) / "metrics.jsonl")], abs=1e-6)
