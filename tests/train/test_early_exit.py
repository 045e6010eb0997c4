"""LayerSkip's recipe: layer-dropout rates and frequencies, the early-exit loss, the curricula, the method."""

import math

import pytest
import torch
import torch.nn.functional as F

from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig
from effllm.models.transformer import CausalLM
from effllm.train import Trainer
from effllm.train.early_exit import early_exit_loss, enabled_exits, exit_weights, layer_dropout_rates
from effllm.train.loss import causal_lm_loss


def tiny(layers=4, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return CausalLM(config)


def batch(seed=0, b=4, t=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def test_dropout_rates_follow_layerskips_exponential_scale():
    rates = layer_dropout_rates(5, 0.2)
    assert rates == pytest.approx([0.2 * (2 ** (i / 4) - 1) for i in range(5)])
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert layer_dropout_rates(3, 0.3, "linear") == pytest.approx([0, 0.15, 0.3])
    assert layer_dropout_rates(3, 0.3, "uniform") == pytest.approx([0.3] * 3)
    with pytest.raises(ConfigError, match="dropout_scale"):
        layer_dropout_rates(3, 0.1, "cubic")


def test_layer_dropout_skips_each_layer_at_its_rate():
    """Count how often each layer runs (a forward hook sees the kept sequences) against p_l, within 4 sigma."""
    model = tiny().train()
    model.model.layer_dropout = [0.0, 0.2, 0.5, 0.8]
    runs = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: runs.__setitem__(i, runs[i] + out.shape[0]))
    n, b = 300, 8
    with torch.no_grad():
        for s in range(n):
            model(batch(s, b=b, t=4)["input_ids"])
    for i, p in enumerate(model.model.layer_dropout):
        total = n * b
        sigma = math.sqrt(total * p * (1 - p))
        assert abs(total - runs[i] - total * p) <= 4 * sigma + 1e-9


def test_no_layer_dropout_at_eval_or_at_zero_rate():
    model = tiny()
    ids = batch()["input_ids"]
    with torch.no_grad():
        reference = model.eval()(ids)
        model.model.layer_dropout = [0.9] * 4
        assert torch.equal(model.eval()(ids), reference)  # eval: off
        model.model.layer_dropout = [0.0] * 4
        assert torch.equal(model.train()(ids), reference)  # rate 0: identical


def test_exit_logits_match_a_truncated_model():
    model = tiny().eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        exits = model(ids, exit_layers=[1, 3])
        truncated = tiny(layers=2).eval()
        state = {
            k: v
            for k, v in model.state_dict().items()
            if not k.startswith(("model.layers.2", "model.layers.3"))
        }
        truncated.load_state_dict(state)
        torch.testing.assert_close(exits[0], truncated(ids))
        torch.testing.assert_close(exits[1], model(ids))


def test_early_exit_loss_with_only_the_last_layer_is_plain_cross_entropy():
    model, b = tiny(), batch()
    torch.testing.assert_close(early_exit_loss(model, b, [3], [1.0]), causal_lm_loss(model, b))
    # Two exits: the weighted sum of each exit's cross-entropy.
    logits = model(b["input_ids"], exit_layers=[1])[0]
    ce1 = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
    torch.testing.assert_close(
        early_exit_loss(model, b, [1, 3], [0.25, 0.75]), 0.25 * ce1 + 0.75 * causal_lm_loss(model, b)
    )


def test_exit_weights_and_curricula():
    assert exit_weights([0, 3], 4) == pytest.approx([1 / 5, 4 / 5])  # linear: l + 1
    assert exit_weights([0, 1, 3], 4, "uniform", exit_scale=0.5) == pytest.approx([0.25, 0.25, 0.5])
    assert enabled_exits(0, 10, 4, "rotational", 2, 0.5) == [0, 2, 3]
    assert enabled_exits(1, 10, 4, "rotational", 2, 0.5) == [1, 3]
    assert enabled_exits(0, 100, 4, "gradual", 2, 0.5) == [3]
    assert enabled_exits(30, 100, 4, "gradual", 2, 0.5) == [2, 3]  # layer l from step 50 * (4 - l) / 4
    assert enabled_exits(40, 100, 4, "gradual", 2, 0.5) == [1, 2, 3]
    assert enabled_exits(50, 100, 4, "gradual", 2, 0.5) == [0, 1, 2, 3]
    assert enabled_exits(0, 1, 4, "none", 2, 0.5) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="curriculum"):
        enabled_exits(0, 1, 4, "random", 2, 0.5)


def test_method_trains_and_rejects_bad_options(make_config):
    trainer = Trainer(
        make_config(steps=3, method="early-exit", method_options={"dropout_max": 0.2, "curriculum": "none"})
    )
    row = trainer.train()
    assert math.isfinite(row["loss"]) and row["exit_layers"] == 2
    assert len(row["eval_exit_loss"]) == 2 and row["eval_exit_loss"][-1] == pytest.approx(
        row["eval_loss"], rel=1e-3
    )
    with pytest.raises(ConfigError, match="loss_scale"):
        Trainer(make_config(name="bad", method="early-exit", method_options={"loss_scale": "cubic"})).setup()
