"""Fused q/k/v and gate/up: the same outputs and state_dict as the separate projections, no second copy."""

import pytest
import torch

from effllm.compress import W4A8, W4A16, W8A8, quantize_
from effllm.models.fused_projections import fuse_projections
from effllm.models.quantized_linear import QuantizedLinear
from tests.compress.conftest import quant_model

QOQ = W4A8(group_size=32, method="rtn", rotate=False, smooth_linear=False)


@pytest.mark.parametrize("config", [None, W4A16(), W8A8(), W4A16(symmetric=False), QOQ])
@pytest.mark.parametrize("rows", [1, 7, 20])
def test_fused_model_computes_the_same_logits(config, rows):
    model = quant_model()
    if config is not None:
        quantize_(model, config, show_progress=False)
    ids = torch.randint(0, 96, (1, rows), generator=torch.Generator().manual_seed(rows))
    keys = list(model.state_dict())
    with torch.inference_mode():
        before = model(ids)
        fused = fuse_projections(model)
        after = model(ids)
    assert fused == (0 if not getattr(config, "symmetric", True) else 4)  # asymmetric zeros stay apart
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys


def test_parts_become_views_and_a_swapped_part_retires_the_fusion():
    model = quant_model()
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    fused = attn.__dict__["fused_qkv"]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    ids = torch.randint(0, 96, (1, 5))
    quantize_(model, W4A16(), show_progress=False)  # replaces q/k/v: the old fused module must not be used
    assert isinstance(attn.q_proj, QuantizedLinear)
    with torch.inference_mode():
        got = model(ids)
        reference = model.model.layers  # unfused path of the same quantized model
        for layer in reference:
            layer.self_attn.__dict__.pop("fused_qkv")
            layer.mlp.__dict__.pop("fused_gate_up")
        torch.testing.assert_close(got, model(ids))


def test_hooks_and_replaced_weights_retire_the_fusion():
    """Calibration hooks must see the projections' inputs, and a fold that replaces a weight (weight.data =)
    must not leave the fused copy stale: both fall back to the separate projections."""
    model = quant_model()
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fuse_projections(model)
        seen = []
        attn = model.model.layers[0].self_attn
        handle = attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        model(ids)
        handle.remove()
        assert seen == [(1, 9, 64)]
        before = model(ids)
        attn.k_proj.weight.data = attn.k_proj.weight.data * 2  # a new tensor, not an in-place change
        after = model(ids)
    assert not torch.allclose(after, before)  # the doubled keys were used, not the fused copy


@pytest.mark.parametrize("rows_per_palette", [None, 16])
@pytest.mark.parametrize("rows", [1, 7])
def test_palettized_parts_fuse_each_row_on_its_own_palette(rows_per_palette, rows):
    from effllm.compress.palettize import palettize_
    from effllm.models.palettized_linear import PalettizedLinear

    model = quant_model()
    palettize_(model, 3, rows_per_palette, show_progress=False)
    ids = torch.randint(0, 96, (1, rows), generator=torch.Generator().manual_seed(rows))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        before = model(ids)
        assert fuse_projections(model) == 4
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    attn = model.model.layers[0].self_attn
    fused = attn.__dict__["fused_qkv"]
    assert isinstance(fused, PalettizedLinear) and fused.row_palette is not None
    assert attn.k_proj.planes.data_ptr() == fused.planes[attn.q_proj.out_features :].data_ptr()  # a view
    after_state = model.state_dict()
    assert list(after_state) == list(state) and all(torch.equal(after_state[k], v) for k, v in state.items())
