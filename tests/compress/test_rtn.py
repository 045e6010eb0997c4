"""Round to nearest: the grid, against a hand-computed example and its error bounds."""

import pytest
import torch

from effllm.compress.rtn import QuantSpec, dequantize, quant_params, quantize, rtn
from effllm.core.errors import InputError


def test_symmetric_int4_by_hand():
    w = torch.tensor([[0.7, -0.33, 0.1, 0.0]])
    spec = QuantSpec(4, 4, True)
    scale, zero = quant_params(w, spec)
    assert zero is None and scale.item() == pytest.approx(0.1)  # max |w| / 7
    assert quantize(w, scale, zero, spec).tolist() == [[7, -3, 1, 0]]


def test_asymmetric_int4_by_hand():
    w = torch.tensor([[1.5, 0.0, 0.72, 0.28]])
    spec = QuantSpec(4, 4, False)
    scale, zero = quant_params(w, spec)
    assert scale.item() == pytest.approx(0.1) and zero.item() == -8  # range [0, 1.5] over 15 steps
    q = quantize(w, scale, zero, spec)
    assert q.tolist() == [[7, -8, -1, -5]]  # round(w / s) + z
    assert torch.allclose(dequantize(q, scale, zero, spec), torch.tensor([[1.5, 0.0, 0.7, 0.3]]))


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 64, False), QuantSpec(8, None, True)])
def test_rtn_error_is_at_most_half_a_step(spec):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    qw = rtn(w, spec)
    assert qw.q.dtype == torch.int8 and qw.q.min() >= spec.qmin and qw.q.max() <= spec.qmax
    step = qw.scale.repeat_interleave(128 // qw.scale.shape[1], dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_shape_checks_say_what_to_choose():
    with pytest.raises(InputError, match="not divisible by group size 128; choose --group-size 32 or 64"):
        QuantSpec(4, 128, True).check("model.layers.0.mlp.down_proj", (576, 1536 + 64))
    with pytest.raises(InputError, match="out_features by 16"):
        QuantSpec(4, 32, True).check("lm_head", (24, 64))
