"""Quantization-ready loading: config.json's effllm.compression section swaps modules before tensors load.

A toy layout stands in for a compressed format: each q_proj stores its weight transposed, as a buffer
(and an int8 buffer rides along, as packed weights would), so the checkpoint holds tensors an nn.Linear
has not. It must round-trip through save_model/load_model with the same logits.
"""

import json

import pytest
import torch
from torch import nn

from effllm.core.errors import CheckpointError
from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.models.layouts import LAYOUTS, register_layout, swap_modules


class TransposedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight_t", torch.empty(in_features, out_features))
        self.register_buffer("tag", torch.zeros(out_features, dtype=torch.int8))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TransposedLinear":
        module = cls(linear.in_features, linear.out_features)
        module.weight_t = linear.weight.detach().t().contiguous()
        module.tag = torch.arange(linear.out_features, dtype=torch.int8)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t.to(x.dtype)


def transposed_q(model: nn.Module, section: dict) -> None:
    swap_modules(
        model,
        lambda name, m: TransposedLinear(m.in_features, m.out_features) if name.endswith("q_proj") else None,
    )


@pytest.fixture
def toy_layout():
    register_layout("test-transposed")(transposed_q)
    yield
    del LAYOUTS["test-transposed"]


def tiny(tie: bool = True) -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return CausalLM(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_a_swapped_layout_round_trips_through_save_and_load(tmp_path, toy_layout, tie):
    model = tiny(tie)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        dense = model(ids)
    swap_modules(model, lambda name, m: TransposedLinear.from_linear(m) if name.endswith("q_proj") else None)
    model.config.effllm["compression"] = {"format": "test-transposed"}
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", dtype="bfloat16", device="cpu")
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, TransposedLinear)
    assert q.tag.dtype == torch.int8 and q.tag.tolist() == list(range(32))  # integer buffers keep their dtype
    assert q.weight_t.dtype == torch.bfloat16
    assert loaded.dtype == torch.bfloat16  # from the embeddings, whatever the layout's modules hold
    with torch.no_grad():
        torch.testing.assert_close(loaded.float()(ids), dense, atol=2e-2, rtol=0)
        torch.testing.assert_close(load_model(tmp_path / "m", dtype="float32", device="cpu")(ids), dense)


def test_an_unknown_layout_is_refused_in_one_line(tmp_path, toy_layout):
    model = tiny()
    model.config.effllm["compression"] = {"format": "no-such-format"}
    save_model(model, tmp_path / "m")
    with pytest.raises(CheckpointError, match="no-such-format.*cannot load"):
        load_model(tmp_path / "m", device="cpu")


def test_a_dense_checkpoint_under_a_layout_names_the_mismatch(tmp_path, toy_layout):
    model = tiny()
    save_model(model, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    raw = json.loads(config.read_text())
    raw["effllm"] = {"compression": {"format": "test-transposed"}}
    config.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unexpected tensor .*q_proj.weight"):
        load_model(tmp_path / "m", device="cpu")
