"""GGUF export: blocks written from EffLLM's codes decode (with gguf's own dequantizer) to EffLLM's weights."""

import numpy as np
import pytest
import torch

from effllm.compress import W4A16, W8A8, W8A16, quantize_
from effllm.compress.gguf_export import export_gguf, permute_rows
from effllm.core.errors import InputError
from effllm.models import load_tokenizer
from effllm.models.default import default_model_path
from effllm.models.tokenizer_training import build_byte_level_tokenizer
from tests.compress.conftest import quant_model

gguf = pytest.importorskip("gguf")


def fp16_scales(module):
    """The module's weights with fp16-rounded scales (GGUF blocks store fp16)."""
    q, zero = module.codes()
    scale = module.weight_scale.half().float()
    w = q.float().reshape(q.shape[0], scale.shape[1], -1)
    if zero is not None:
        w = w - zero.float().unsqueeze(-1)
    return (w * scale.unsqueeze(-1)).reshape(q.shape)


@pytest.mark.parametrize(
    ("config", "kind"), [(W4A16(), "Q4_0"), (W4A16(symmetric=False), "Q4_1"), (W8A16(), "Q8_0")]
)
def test_exported_blocks_decode_to_our_weights(tmp_path, config, kind):
    model = quant_model(tie=False)
    quantize_(model, config, show_progress=False)
    path = export_gguf(
        model, load_tokenizer(default_model_path()), tmp_path / "m.gguf"
    )  # its first 96 tokens
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["blk.0.attn_q.weight"]
    assert t.tensor_type.name == kind
    decoded = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    ours = permute_rows(fp16_scales(model.model.layers[0].self_attn.q_proj), 4)  # llama.cpp's row order
    # (Q4_1 also rounds its offset m = -(z + 8) s to fp16: hence the tolerance)
    np.testing.assert_allclose(decoded.reshape(ours.shape), ours.numpy(), rtol=1e-3, atol=2e-3)
    down = gguf.quants.dequantize(
        np.asarray(tensors["blk.1.ffn_down.weight"].data), tensors["blk.1.ffn_down.weight"].tensor_type
    )
    np.testing.assert_allclose(
        down.reshape(64, 128), fp16_scales(model.model.layers[1].mlp.down_proj).numpy(), rtol=1e-3, atol=2e-3
    )
    assert tensors["output.weight"].tensor_type.name == "BF16" and "token_embd.weight" in tensors
    fields = reader.fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"


def test_grids_without_a_gguf_block_are_refused_before_writing(tmp_path):
    for config in (W4A16(group_size=64), W8A8()):
        model = quant_model(tie=False)
        quantize_(model, config, show_progress=False)
        with pytest.raises(InputError, match="no exact GGUF block"):
            export_gguf(model, load_tokenizer(default_model_path()), tmp_path / "m.gguf")
        assert not (tmp_path / "m.gguf").exists()
    model = quant_model(tie=False)
    quantize_(model, W4A16(), show_progress=False)
    with pytest.raises(InputError, match="no BPE merges"):
        export_gguf(model, build_byte_level_tokenizer(), tmp_path / "m.gguf")


def test_permutation_matches_llama_cpps_converter():
    w = torch.arange(8 * 3).reshape(8, 3)
    ref = w.numpy().reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)  # convert_hf_to_gguf's permute, 2 heads
    assert np.array_equal(permute_rows(w, 2).numpy(), ref)


@pytest.mark.parametrize(("config", "kind"), [(W4A16(), "QuantizedLinear"), (W8A16(), "Linear")])
def test_gguf_round_trip_through_import(tmp_path, config, kind, capsys):
    from effllm.cli import main
    from effllm.models import load_model

    tokenizer = load_tokenizer(default_model_path())
    model = quant_model(seed=3, tie=True, vocab_size=tokenizer.vocab_size)
    quantize_(model, config, show_progress=False)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", dense="f32")
    assert (
        main(
            [
                "compress",
                "import-gguf",
                str(tmp_path / "m.gguf"),
                "--out",
                str(tmp_path / "imp"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    back = load_model(tmp_path / "imp", device="cpu")
    assert type(back.model.layers[0].self_attn.q_proj).__name__ == kind  # Q4_0 stays 4-bit, Q8_0 is dense
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged")])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=2e-2, atol=2e-2)  # fp16 block scales
    assert load_tokenizer(tmp_path / "imp").encode("Mr. Darcy's ball, 1813!") == tokenizer.encode(
        "Mr. Darcy's ball, 1813!"
    )
    assert "already exists" in _err(
        main, capsys, ["compress", "import-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "imp")]
    )


def _err(main, capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err
