"""GPTQ and AWQ checkpoints: written here by hand in their documented layouts, read by load_model."""

import json

import pytest
import torch
from safetensors.torch import save_file

from effllm.core.errors import CheckpointError
from effllm.models import load_model, save_model
from effllm.models.foreign_quant import AWQ_ORDER
from effllm.models.quantized_linear import QuantizedLinear
from tests.compress.conftest import quant_model

GROUP = 32


def to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(u: torch.Tensor) -> torch.Tensor:  # [K, N] -> [K/8, N], column k in nibble k % 8
    k, n = u.shape
    return to_int32((u.long().reshape(k // 8, 8, n) << (4 * torch.arange(8)).view(1, 8, 1)).sum(1))


def pack_columns(u: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:  # [R, C] -> [R, C/8]
    r, c = u.shape
    groups = u.long().reshape(r, c // 8, 8)[..., list(order)]  # nibble p holds column order[p]
    return to_int32((groups << (4 * torch.arange(8))).sum(-1))


def write_checkpoint(folder, method, v1=True, g_idx=None):
    """A quant_model with every layer linear stored as `method`; returns the expected dense weights."""
    model = quant_model(seed=2)
    save_model(model, folder)
    state = {
        k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq") and k != "lm_head.weight"
    }
    gen = torch.Generator().manual_seed(0)
    expected = {}
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or name == "lm_head":
            continue
        n, k = module.weight.shape
        q = torch.randint(0, 16, (n, k), generator=gen)
        z = torch.randint(1, 16, (n, k // GROUP), generator=gen)
        scales = torch.rand(k // GROUP, n, generator=gen) / 10 + 0.01
        expected[name] = (q - z.repeat_interleave(GROUP, 1)) * scales.t().repeat_interleave(GROUP, 1)
        del state[name + ".weight"]
        if method == "gptq":
            state[name + ".qweight"] = pack_rows(q.t())
            state[name + ".qzeros"] = pack_columns(z.t() - (1 if v1 else 0))
            state[name + ".g_idx"] = (torch.arange(k) // GROUP).int() if g_idx is None else g_idx(k)
        else:
            state[name + ".qweight"] = pack_columns(q.t(), AWQ_ORDER)
            state[name + ".qzeros"] = pack_columns(z.t(), AWQ_ORDER)
        state[name + ".scales"] = scales.half()
        expected[name] = (q - z.repeat_interleave(GROUP, 1)) * scales.half().float().t().repeat_interleave(
            GROUP, 1
        )
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = (
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP,
            "desc_act": False,
            "sym": False,
            "checkpoint_format": "gptq" if v1 else "gptq_v2",
        }
        if method == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return model, expected


@pytest.mark.parametrize(("method", "v1"), [("gptq", True), ("gptq", False), ("awq", True)])
def test_gptq_and_awq_checkpoints_load_with_their_weights(tmp_path, method, v1):
    dense, expected = write_checkpoint(tmp_path, method, v1)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear)
        torch.testing.assert_close(module.dequantized_weight(), weight, rtol=1e-6, atol=1e-6)
        dense.get_submodule(name).weight.data.copy_(weight)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=1e-4, atol=1e-4)
    assert model.config.quantization_config["quant_method"] == "compressed-tensors"
    save_model(model, tmp_path / "ct")  # a loaded GPTQ / AWQ model saves as compressed-tensors
    again = load_model(tmp_path / "ct", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_act_order_gptq_is_refused_with_a_reason(tmp_path):
    write_checkpoint(tmp_path, "gptq", g_idx=lambda k: (torch.arange(k) % (k // GROUP)).int())
    with pytest.raises(CheckpointError, match="act-order groups"):
        load_model(tmp_path, device="cpu")


def test_awq_nibble_order_matches_the_reverse_order_unpacking_peers_use():
    from effllm.models.foreign_quant import unpack_columns

    word = sum(p << (4 * p) for p in range(8))  # nibble p holds the value p
    by_position = torch.tensor([[word]], dtype=torch.int64).to(torch.int32)
    reverse_order = [0, 4, 1, 5, 2, 6, 3, 7]  # vLLM's AWQ_REVERSE_ORDER: column j is nibble reverse_order[j]
    assert unpack_columns(by_position, AWQ_ORDER).tolist() == [reverse_order]
