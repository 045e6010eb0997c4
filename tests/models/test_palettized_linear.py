"""`PalettizedLinear` and the `palettized` layout: bit planes round trip, a saved palettized model loads
back with the same logits (and runs in the engine), and a bad section is one clear error."""

import json

import pytest
import torch
from torch import nn

from effllm.core.errors import CheckpointError, ConfigError
from effllm.engine.llm import LLM
from effllm.engine.sampling_params import SamplingParams
from effllm.models import CausalLM, ModelConfig, load_model, save_model
from effllm.models.palettized_linear import PalettizedLinear, pack_planes, unpack_planes


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bit_planes_round_trip_and_take_bits_bits_per_weight(bits):
    indices = torch.randint(0, 2**bits, (6, 96))
    planes = pack_planes(indices, bits)
    assert planes.dtype == torch.uint8 and planes.numel() * 8 == indices.numel() * bits
    assert torch.equal(unpack_planes(planes), indices)


def test_the_planes_layout_is_the_documented_one():
    """Bit j of plane word p of a block is bit p of column 32 b + j's index (little-endian words)."""
    indices = torch.zeros(1, 64, dtype=torch.long)
    indices[0, 33] = 0b101  # block 1, column 1: bits 0 and 2
    planes = pack_planes(indices, 3)  # [1, 2, 12]: per block, three 4-byte words
    words = planes[0, 1].view(torch.int32)
    assert words.tolist() == [1 << 1, 0, 1 << 1] and planes[0, 0].eq(0).all()


def test_bad_shapes_and_indices_are_refused():
    with pytest.raises(ConfigError, match="multiple of 32"):
        PalettizedLinear(40, 8, False, 3)
    with pytest.raises(ConfigError, match="divide"):
        PalettizedLinear(32, 8, False, 3, rows_per_palette=3)
    with pytest.raises(ConfigError, match="bits"):
        PalettizedLinear(32, 8, False, 9)
    module = PalettizedLinear(32, 8, False, 2)
    with pytest.raises(ConfigError, match=r"\[0, 3\]"):
        module.set_indices(torch.full((8, 32), 4), torch.zeros(1, 4))


def tiny_model():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=None,
    )
    return CausalLM(config).eval()


def test_a_palettized_model_saves_loads_and_generates(tmp_path):
    from effllm.compress.palettize import palettize_

    model = tiny_model()
    assert palettize_(model, bits=3, rows_per_palette=32, show_progress=False) == 14
    ids = torch.randint(0, 96, (2, 12))
    with torch.inference_mode():
        expected = model(ids)
    save_model(model, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["effllm"]["compression"]["format"] == "palettized"
    loaded = load_model(tmp_path / "p", dtype=torch.float32, device="cpu")
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, PalettizedLinear)
    assert type(loaded.lm_head) is nn.Linear
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), expected)
    # decode steps (the kernel) and prefill (tiles) in the engine, against the plain forward's greedy tokens
    llm = LLM(loaded)
    prompt = ids[0].tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(5):
            seq.append(int(loaded(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[len(prompt) :]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"format": "palettized", "bits": 0}, "bits"),
        ({"format": "palettized", "bits": 3, "rows_per_palette": "all"}, "rows_per_palette"),
        ({"format": "palettized", "bits": 3, "rows_per_palette": 48}, "does not fit"),
    ],
)
def test_a_bad_section_is_one_clear_error(tmp_path, section, message):
    model = tiny_model()
    save_model(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["effllm"] = {"compression": section}
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "m", device="cpu")
