"""quantize_ end to end: schemes and methods, the compressed-tensors checkpoint, bad input, the engine."""

import json

import pytest
import torch
from safetensors.torch import load_file

from effllm.compress import W4A8, W4A16, W8A8, W8A16, quantize_
from effllm.core.errors import CheckpointError, InputError
from effllm.engine.config import EngineConfig
from effllm.engine.llm_engine import LLMEngine
from effllm.engine.sampling_params import SamplingParams
from effllm.models import load_model, save_model
from effllm.models.quantized_linear import QuantizedLinear
from tests.compress.conftest import quant_model

CONFIGS = [
    W8A16(),
    W8A16(method="gptq"),
    W8A16(method="awq"),
    W4A16(),
    W4A16(symmetric=False),
    W4A16(group_size=64, method="gptq"),
    W4A16(method="gptq", act_order=True),
    W4A16(method="awq"),
    W8A8(),
    W8A8(method="smoothquant"),
    W8A8(method="gptq"),
]


def ids_of(cfg):
    return f"{type(cfg).__name__}-{cfg.method}"


@pytest.mark.parametrize("config", CONFIGS, ids=ids_of)
def test_every_scheme_and_method_quantizes_every_linear_but_the_head(model, calibration, config):
    ids = calibration[:2]
    with torch.no_grad():
        dense = model(ids)
    quantize_(model, config, calibration=calibration, show_progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == 2 * 7 and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        quantized = model(ids)
    rel = ((quantized - dense).norm() / dense.norm()).item()
    assert 0 < rel < (0.25 if isinstance(config, W4A16) else 0.05)
    qc = model.config.quantization_config
    assert qc["quant_method"] == "compressed-tensors" and "lm_head" in qc["ignore"]
    assert qc["format"] == ("int-quantized" if isinstance(config, W8A8) else "pack-quantized")


@pytest.mark.parametrize("config", [W4A16(symmetric=False), W8A16(), W8A8()], ids=ids_of)
def test_checkpoint_round_trips_and_compressed_tensors_decompresses_it(model, tmp_path, config):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    quantize_(model, config, show_progress=False)
    save_model(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    loaded = load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.mlp.gate_proj."
    module = model.get_submodule(prefix[:-1])
    if isinstance(config, W8A8):
        assert tensors[prefix + "weight"].dtype == torch.int8 and tensors[prefix + "weight_scale"].shape == (
            128,
            1,
        )
        return
    group = saved["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    data = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    theirs = PackedQuantizationCompressor.decompress(data, scheme)["weight"]
    torch.testing.assert_close(theirs.float(), module.dequantized_weight(), rtol=1e-6, atol=1e-6)


def test_quantizing_a_tied_head_unties_it(model):
    quantize_(model, W8A16(skip=[]), show_progress=False)
    assert isinstance(model.lm_head, QuantizedLinear) and not model.config.tie_word_embeddings
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_bad_input_is_one_line_and_changes_nothing(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="not divisible by group size 128"):
        quantize_(quant_model(), W4A16(group_size=128), show_progress=False)  # K = 64
    with pytest.raises(InputError, match="choose 32, 64 or 128"):
        quantize_(model, W4A16(group_size=48), show_progress=False)
    with pytest.raises(InputError, match="does not apply to W4A16"):
        quantize_(model, W4A16(method="smoothquant"), show_progress=False)
    with pytest.raises(InputError, match="needs calibration ids"):
        quantize_(model, W4A16(method="gptq"), show_progress=False)
    with pytest.raises(InputError, match="no linear layer is left"):
        quantize_(model, W8A16(skip=["re:.*"]), show_progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_layout_refuses_formats_it_cannot_read(model, tmp_path):
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'bitsandbytes', which EffLLM cannot load yet"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("config", [W4A16(), W8A8()], ids=ids_of)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_output_equals_the_eager_quantized_model(config, dtype):
    model = quant_model(seed=1).to(dtype)
    quantize_(model, config, show_progress=False)
    prompt = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    eager, tokens = [], list(prompt)
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([tokens]))[0, -1].float().argmax())
            eager.append(nxt)
            tokens.append(nxt)
    engine = LLMEngine(model, config=EngineConfig(enable_prefix_caching=False))
    engine.add_request(
        "r", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    assert out.outputs[0].token_ids == eager


def test_analyze_reads_the_bit_widths_from_the_checkpoint(model):
    from effllm.analyze.shapes import checkpoint_bits

    assert checkpoint_bits(model.config) == (16.0, None)
    quantize_(model, W4A16(group_size=32), show_progress=False)
    assert checkpoint_bits(model.config) == (4.5, None)
    other = quant_model()
    quantize_(other, W8A8(), show_progress=False)
    assert checkpoint_bits(other.config) == (8.0, 8.0)
    qoq = quant_model()
    quantize_(qoq, W4A8(group_size=32, method="rtn", rotate=False, smooth_linear=False), show_progress=False)
    assert checkpoint_bits(qoq.config) == (4.5, 8.0)
    from effllm.compress.palettize import palettize_

    palettized = quant_model()
    palettize_(palettized, 3, show_progress=False)
    assert checkpoint_bits(palettized.config) == (3.0, None)


def test_resident_and_streamed_bytes_count_each_storage_once(model):
    from effllm.compress.sizes import resident_bytes, streamed_bytes

    dense = sum(p.numel() * 4 for p in model.parameters())  # fp32, the tied head counted once
    embed = model.model.embed_tokens.weight.numel() * 4
    assert resident_bytes(model) == dense and streamed_bytes(model) == dense  # tied: the head is the table
    quantize_(model, W4A16(), show_progress=False)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    stored = sum(b.numel() * b.element_size() for m in quantized for b in m.buffers())
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert resident_bytes(model) == stored + norms + embed
    assert streamed_bytes(model) == stored + norms + embed  # the tied head streams the table
    untied = quant_model(tie=False)
    table = untied.model.embed_tokens.weight.numel() * 4
    assert streamed_bytes(untied) == resident_bytes(untied) - table  # one row of the table per token
