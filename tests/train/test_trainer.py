import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effllm.models import load_model
from effllm.models.tokenizer import load_tokenizer
from effllm.train import Trainer, train
from effllm.train.metrics import read_metrics
from effllm.train.packing import IGNORE_INDEX
from effllm.train.schedule import WarmupDecay


def losses(out) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl")]


def test_tiny_model_overfits_tiny_corpus(make_config):
    config = make_config(steps=60, lr=2e-2, warmup_steps=5, eval_every=20)
    last = train(config)
    out = Path(config.out)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert rows[0]["loss"] > 4.0  # about ln(272) at the start
    assert last["loss"] < 0.6 and last["eval_loss"] < 0.6
    assert [r["step"] for r in rows if "eval_loss" in r] == [20, 40, 60]
    assert (out / "loss.png").stat().st_size > 0 and (out / "train_config.yaml").exists()

    model = load_model(out, device="cpu")  # the final model, ready for `effllm generate --model OUT`
    tokenizer = load_tokenizer(out)
    ids = tokenizer.encode("fox jumps over the lazy ")  # within the 32 trained positions
    for _ in range(3):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokenizer.decode(ids[-3:]) == "dog"


def test_gradient_accumulation_matches_one_large_batch(make_config, tmp_path):
    big = train(make_config("big", batch_size=4, grad_accum=1))
    small = train(make_config("accum", batch_size=2, grad_accum=2))
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "accum"), abs=1e-5)
    assert big["loss"] == pytest.approx(small["loss"], abs=1e-5)


def test_activation_checkpointing_changes_no_loss(make_config, tmp_path):
    train(make_config("plain", steps=3))
    train(make_config("ckpt", steps=3, activation_checkpointing=True))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


def test_bf16_autocast_trains(make_config):
    config = make_config(steps=12, precision="bf16", lr=1e-2)
    train(config)
    values = losses(Path(config.out))
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0] - 0.5


def test_zeroth_order_optimizer_steps_without_backward(make_config):
    trainer = Trainer(make_config(steps=3, optimizer="zo_sgd", lr=1e-3))
    trainer.setup()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(p.grad is None for p in trainer.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))


def test_lisa_trains_only_the_sampled_blocks(make_config):
    seen = []

    class Spy:
        def on_step_end(self, step, metrics):
            layers = trainer.model.model.layers
            seen.append([all(p.requires_grad for p in layer.parameters()) for layer in layers])

    trainer = Trainer(
        make_config(steps=4, method="lisa", method_options={"num_active_layers": 1, "interval_steps": 2}),
        callbacks=[Spy()],
    )
    trainer.train()
    assert all(sum(active) == 1 for active in seen)
    assert seen[0] == seen[1] and seen[2] == seen[3]


def test_schedule_warms_up_then_decays_to_the_floor():
    schedule = WarmupDecay(total_steps=100, warmup_steps=10, kind="cosine", min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.55) and schedule(100) == pytest.approx(0.1)
    assert WarmupDecay(100, 0, "constant")(70) == 1.0


def test_supervised_fine_tuning_takes_the_loss_on_assistant_tokens_only(make_config, tmp_path):
    chat = {
        "messages": [
            {"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    data = tmp_path / "chats.jsonl"
    data.write_text((json.dumps(chat) + "\n") * 40)
    trainer = Trainer(make_config(data=[str(data)], steps=2, eval_fraction=0))
    trainer.setup()
    batch = trainer._micro_batches()[0]
    labels = batch["labels"]
    targets = labels[labels != IGNORE_INDEX]
    assert set(targets.tolist()) <= set(
        trainer.tokenizer.encode("Blue.<|im_end|>\n", add_special_tokens=False)
    )
    with torch.no_grad():
        logits = trainer.model(batch["input_ids"])  # [B, T, V]
    masked = float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX))
    every = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten()))
    trainer.train()
    first = read_metrics(Path(trainer.out) / "metrics.jsonl")[0]["loss"]
    assert first == pytest.approx(masked, abs=1e-5) and abs(first - every) > 1e-3


def test_save_dtype_casts_the_final_model_only(make_config):
    from safetensors import safe_open

    from effllm.train.checkpointing import list_checkpoints

    config = make_config("bf16-out", steps=2, save_every=2, save_dtype="bfloat16")
    train(config)
    out = Path(config.out)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    (_, folder), *_ = list_checkpoints(out)
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.float32}  # --resume stays exact
