"""G_stack: factor 1 is the identity, the grown layers are copies of their sources, the grown forward is the
source's layers run in the stacking order, and the grown checkpoint loads in transformers with our logits."""

import pytest
import torch

from effllm.cli import main
from effllm.core.errors import ConfigError
from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.train.growth import growth_tokens, stack, stacking_order

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def small(seed=0):
    torch.manual_seed(seed)
    return CausalLM(CONFIG).eval()


def test_factor_one_is_the_identity():
    model = small()
    with torch.no_grad():
        torch.testing.assert_close(stack(model, factor=1)(IDS), model(IDS))


def test_grown_layers_copy_their_sources_and_run_in_stacking_order():
    model = small(1)
    grown = stack(model, factor=4)
    assert stacking_order(3, 4) == [0, 1, 2] * 4 and grown.config.num_hidden_layers == 12
    for i, layer in enumerate(grown.model.layers):
        source = model.model.layers[i % 3]
        assert layer is not source and layer.self_attn.layer_idx == i
        for a, b in zip(layer.state_dict().values(), source.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)
    with torch.no_grad():  # the source's layers applied four times over, by hand
        stack_ = model.model
        positions = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1)
        cos, sin = stack_.rotary_emb(positions, torch.float32)
        x = stack_.embed(IDS)
        for i in [0, 1, 2] * 4:
            x = stack_.layers[i](x, cos, sin)
        torch.testing.assert_close(grown(IDS), model.lm_head(stack_.norm(x)), rtol=1e-5, atol=1e-5)
    grown.model.layers[0].mlp.up_proj.weight.data.add_(1.0)  # copies, not shared storage
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, grown.model.layers[0].mlp.up_proj.weight)


def test_custom_orders_and_bad_factors():
    grown = stack(small(), order=[0, 0, 1, 2, 2])
    assert grown.config.num_hidden_layers == 5
    with pytest.raises(ConfigError, match="at least 1"):
        stack(small(), factor=0)
    with pytest.raises(ConfigError, match="names layers"):
        stack(small(), order=[0, 3])


def test_growth_timing_reproduces_the_papers_llama2_7b_figure():
    # 7B parameters and a budget of 6 N x 2T tokens: the paper's d = 11.11B tokens
    assert growth_tokens(7e9, 6 * 7e9 * 1.95e12) == pytest.approx(11.11e9, rel=0.05)


def test_cli_grows_a_checkpoint_transformers_loads(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    save_model(small(2), tmp_path / "small")
    assert (
        main(
            [
                "train",
                "grow",
                "--from",
                str(tmp_path / "small"),
                "--factor",
                "2",
                "--out",
                str(tmp_path / "big"),
            ]
        )
        == 0
    )
    assert "from 3 to 6 layers" in capsys.readouterr().out
    ours = load_model(tmp_path / "big", dtype=torch.float32, device="cpu").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "big", torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS), rtol=1e-4, atol=1e-4)
