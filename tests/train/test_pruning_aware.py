"""Pruning-aware pretraining: the size target, the cubic schedule, the masks held during training, the
smaller final checkpoint, and an exact resume after a kill."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.models import load_model
from effllm.models.config import ModelConfig
from effllm.train import Trainer, train
from effllm.train.checkpointing import list_checkpoints
from effllm.train.metrics import read_metrics
from effllm.train.pruning_aware import cubic_share, parameter_count, removal_steps, target_widths

from .conftest import TINY_MODEL
from .test_resume import run_until_killed


def test_target_widths_land_at_or_just_under_the_target():
    config = ModelConfig(**{k: v for k, v in TINY_MODEL.items()})
    full = parameter_count(config)
    target = full - 5000
    channels, kv = target_widths(config, target)
    assert kv == 0
    smaller = dataclasses.replace(config, intermediate_size=config.intermediate_size - channels)
    one_more = dataclasses.replace(config, intermediate_size=config.intermediate_size - channels + 1)
    assert parameter_count(smaller) <= target < parameter_count(one_more)
    channels, kv = target_widths(config, target, kv_group_ratio=0.5)
    assert kv == 1 and channels < target_widths(config, target)[0]
    with pytest.raises(ConfigError, match="not below"):
        target_widths(config, full)
    with pytest.raises(ConfigError, match="smallest model"):
        target_widths(config, 1000)
    with pytest.raises(ConfigError, match="multiple of 1/2"):
        target_widths(config, target, kv_group_ratio=0.3)


def test_the_schedule_is_cubic_and_ends_at_the_target():
    assert removal_steps(100, 0.1, 0.6, 6) == [10, 20, 30, 40, 50, 60]
    shares = [cubic_share(t, 6) for t in range(1, 7)]
    assert shares == sorted(shares) and shares[-1] == 1.0
    gains = [b - a for a, b in zip([0, *shares[:-1]], shares, strict=True)]
    assert gains == sorted(gains, reverse=True)  # fast early, gentle late
    with pytest.raises(ConfigError, match="start <= end"):
        removal_steps(100, 0.7, 0.6, 4)


def run_config(make_config, name, **options):
    values = dict(steps=8, method="pruning-aware", target_params=0, save_every=2)
    values.update(options)
    return make_config(name, **values)


def tiny_target(assets, channels=24):
    config = ModelConfig.from_json_file(assets / "config.json")
    return parameter_count(dataclasses.replace(config, intermediate_size=config.intermediate_size - channels))


def test_training_shrinks_to_the_target_and_writes_a_smaller_checkpoint(make_config, assets, tmp_path):
    target = tiny_target(assets)
    config = run_config(
        make_config, "shrink", target_params=target, method_options={"start": 0.25, "end": 0.5, "removals": 3}
    )
    trainer = Trainer(config)
    trainer.train()
    rows = read_metrics(Path(config.out) / "metrics.jsonl")
    params = [row["params"] for row in rows]
    assert params == sorted(params, reverse=True) and params[0] > target and params[-1] == target
    final = load_model(config.out, dtype=torch.float32, device="cpu")
    assert final.config.intermediate_size == TINY_MODEL["intermediate_size"] - 24
    assert sum(p.numel() for p in final.parameters()) == target
    assert json.loads((Path(config.out) / "config.json").read_text())["intermediate_size"] == 40
    # The last checkpoint holds the full-width model with the removed groups at exactly zero; the final
    # model computes the same logits without them.
    (_, folder), *_ = reversed(list_checkpoints(Path(config.out)))
    wide = load_model(folder, dtype=torch.float32, device="cpu").eval()
    dead = (wide.model.layers[0].mlp.down_proj.weight == 0).all(0)
    assert int(dead.sum()) == 24 and (wide.model.layers[0].mlp.up_proj.weight[dead] == 0).all()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(final.eval()(ids), wide(ids), rtol=1e-5, atol=1e-5)


def test_kv_groups_go_too_and_the_result_loads_in_transformers(make_config, assets):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.from_json_file(assets / "config.json")
    target = parameter_count(
        dataclasses.replace(config, intermediate_size=48, num_key_value_heads=1, num_attention_heads=2)
    )
    run = run_config(
        make_config, "kv", target_params=target, method_options={"kv_group_ratio": 0.5, "removals": 2}
    )
    train(run)
    ours = load_model(run.out, dtype=torch.float32, device="cpu").eval()
    assert ours.config.num_key_value_heads == 1 and ours.config.intermediate_size == 48
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run.out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_pruning_aware_training_resumes_exactly_after_a_kill(make_config, assets):
    target = tiny_target(assets)
    options = {"start": 0.1, "end": 0.7, "removals": 4}
    reference = run_config(make_config, "reference", target_params=target, method_options=options)
    train(reference)
    expected = [row["loss"] for row in read_metrics(Path(reference.out) / "metrics.jsonl")]

    killed = run_config(make_config, "killed", target_params=target, method_options=options, keep_last=1)
    out = Path(killed.out)
    extra = ["--method", "pruning-aware", "--target-params", str(target), "--method-options"]
    extra += [f"{k}={v}" for k, v in options.items()]
    run_until_killed(killed, "checkpoint: saved " + str(out / "checkpoints" / "step-00000004"), None, extra)
    assert [step for step, _ in list_checkpoints(out)] == [4]
    killed.resume = True
    train(killed)
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["loss"] for row in rows] == pytest.approx(expected, abs=1e-6)
    a = load_model(reference.out, dtype=torch.float32, device="cpu")
    b = load_model(killed.out, dtype=torch.float32, device="cpu")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_bad_pruning_aware_options_are_refused(make_config, assets):
    with pytest.raises(ConfigError, match="needs --target-params"):
        Trainer(make_config("a", method="pruning-aware")).setup()
    with pytest.raises(ConfigError, match="add that method"):
        make_config("b", target_params=1000).validate()
    with pytest.raises(ConfigError, match="importance"):
        Trainer(
            run_config(
                make_config, "c", target_params=tiny_target(assets), method_options={"importance": "x"}
            )
        ).setup()
    with pytest.raises(ConfigError, match="zeroth|gradients"):
        Trainer(run_config(make_config, "d", target_params=tiny_target(assets), optimizer="zo_sgd")).setup()


def test_a_resume_that_would_move_the_schedule_is_refused(make_config, assets):
    target = tiny_target(assets)
    train(run_config(make_config, "done", target_params=target))
    longer = run_config(make_config, "done", target_params=target, steps=12, resume=True)
    with pytest.raises(ConfigError, match="its own --steps"):
        Trainer(longer).setup()
