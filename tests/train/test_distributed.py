"""The same command under torchrun: 2 CPU processes (gloo) against 1 with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest

from effllm.models import load_model
from effllm.train import train
from effllm.train.checkpointing import list_checkpoints
from effllm.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def torchrun(config, *extra: str) -> None:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "effllm.train",
        "--model-config",
        config.model_config,
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
        "--schedule",
        config.schedule,
        "--eval-fraction",
        str(config.eval_fraction),
        "--no-tensorboard",
        "--device",
        "cpu",
        *extra,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(config) -> list[float]:
    return [row["loss"] for row in read_metrics(Path(config.out) / "metrics.jsonl")]


@pytest.fixture
def single(make_config):
    config = make_config("single", steps=6, batch_size=4, schedule="constant", eval_every=3)
    train(config)
    return config


def test_ddp_two_processes_match_one_with_the_same_global_batch(make_config, single):
    ddp = make_config("ddp", steps=6, batch_size=2, schedule="constant")
    torchrun(ddp, "--parallel", "ddp", "--eval-every", "3")
    assert losses(ddp) == pytest.approx(losses(single), abs=2e-5)
    held = [r["eval_loss"] for r in read_metrics(Path(ddp.out) / "metrics.jsonl") if "eval_loss" in r]
    expected = [r["eval_loss"] for r in read_metrics(Path(single.out) / "metrics.jsonl") if "eval_loss" in r]
    assert held == pytest.approx(expected, abs=2e-5)


def test_fsdp_saves_sharded_checkpoints_and_resumes_them(make_config, single):
    fsdp = make_config("fsdp", steps=4, batch_size=2, schedule="constant")
    torchrun(fsdp, "--parallel", "fsdp", "--save-every", "2")
    ((_, newest),) = list_checkpoints(fsdp.out)[-1:]
    assert sorted(p.name for p in (newest / "sharded").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    load_model(newest, device="cpu")  # the full model is there too, in the Hugging Face layout

    fsdp.steps = 6
    torchrun(fsdp, "--parallel", "fsdp", "--save-every", "2", "--resume")
    assert losses(fsdp) == pytest.approx(losses(single), abs=2e-5)
    assert load_model(fsdp.out, device="cpu").config.num_hidden_layers == 2
