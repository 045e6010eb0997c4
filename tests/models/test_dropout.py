"""Training-time dropout (`CausalLM.set_dropout`): off in eval mode, seeded in train mode, checkpoint-safe."""

import pytest
import torch

from effllm.models.config import ModelConfig
from effllm.models.transformer import CausalLM


def _model() -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig.from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return CausalLM(config)


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def test_eval_mode_is_unchanged_and_zero_dropout_is_the_plain_model():
    model = _model().eval()
    plain = model(IDS)
    model.set_dropout(0.5)
    assert torch.equal(model(IDS), plain)
    model.set_dropout(0.0)
    assert torch.equal(model.train()(IDS), plain)


def test_train_mode_drops_with_the_torch_seed():
    model = _model().train()
    plain = model(IDS)
    model.set_dropout(0.3)
    torch.manual_seed(5)
    a = model(IDS)
    torch.manual_seed(5)
    b = model(IDS)
    assert torch.equal(a, b) and not torch.allclose(a, plain, atol=1e-3)
    # the embedding output itself: about p of it zeroed, the rest scaled by 1/(1-p)
    captured = {}
    model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, inp, out: captured.setdefault("x", inp[0])
    )
    model(IDS)
    x, emb = captured["x"], model.model.embed_tokens(IDS)
    kept = x != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.4
    assert torch.allclose(x[kept], emb[kept] / 0.7)


def test_activation_checkpointing_replays_the_same_masks():
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        model.set_dropout(0.2)
        model.set_activation_checkpointing(checkpointing)
        torch.manual_seed(7)
        model(IDS).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_invalid_probability():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        _model().set_dropout(1.0)
