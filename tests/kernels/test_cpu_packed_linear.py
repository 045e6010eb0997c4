"""oneDNN-prepacked bfloat16 linears: the same products as F.linear, never used once the weight changed,
and packed only where the engine runs them (fused projections, not their parts)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effllm.kernels.cpu_packed_linear import PackedWeight, packed_bf16_available
from effllm.models.decode_linear import DecodeLinear, prepack_bf16, use_decode_linears
from effllm.models.fused_projections import fuse_projections

pytestmark = pytest.mark.skipif(not packed_bf16_available(), reason="no oneDNN bfloat16 on this CPU")


@pytest.mark.parametrize("rows", [1, 9, 64, 300])
def test_packed_product_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen).bfloat16()
    b = torch.randn(96, generator=gen).bfloat16()
    x = torch.randn(2, rows, 80, generator=gen).bfloat16()
    got = PackedWeight(w).linear(x, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.shape == (2, rows, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_a_changed_weight_is_not_read_from_the_stale_pack():
    layer = nn.Linear(64, 32, bias=False).bfloat16()
    use_decode_linears(layer)
    assert prepack_bf16(layer) == 1 and isinstance(layer.__dict__["packed"], PackedWeight)
    x = torch.randn(16, 64).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight).float(), rtol=2e-2, atol=5e-2)
        layer.weight.mul_(2)  # in place: the pack no longer matches
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_prepack_packs_fused_projections_not_their_parts_and_skips_float32():
    from effllm.models import CausalLM, ModelConfig

    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = CausalLM(config).bfloat16().eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.inference_mode():
        before = model(ids).float()
    use_decode_linears(model)
    fuse_projections(model)
    # per layer: fused qkv, o_proj, fused gate/up, down_proj; and the head
    assert prepack_bf16(model) == 2 * 4 + 1
    attn = model.model.layers[0].self_attn
    assert "packed" in attn.__dict__["fused_qkv"].__dict__ and "packed" not in attn.q_proj.__dict__
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).float(), before, rtol=5e-2, atol=5e-2)
    assert prepack_bf16(CausalLM(config).eval()) == 0  # float32 weights: nothing to pack
    assert isinstance(model.lm_head, DecodeLinear)


def test_a_model_with_packs_can_be_copied_and_pickled():
    import copy
    import io

    layer = nn.Linear(64, 32, bias=False).bfloat16()
    use_decode_linears(layer)
    prepack_bf16(layer)
    x = torch.randn(16, 64).bfloat16()
    copied = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.inference_mode():
        for other in (copied, loaded):
            assert not other.__dict__["packed"].matches(other.weight)  # its own weight: F.linear
            torch.testing.assert_close(other(x), F.linear(x, layer.weight))
