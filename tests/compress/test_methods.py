"""GPTQ, AWQ and SmoothQuant against their papers' objectives, on the same weights and inputs."""

import pytest
import torch

from effllm.compress import W4A16, W8A8, awq, gptq, smoothquant
from effllm.compress.calibration import LINEAR_GROUPS, LayerByLayer
from effllm.compress.rtn import QuantSpec, rtn
from effllm.compress.schemes import _rescale_layer


def correlated_inputs(tokens=512, k=128, seed=0):
    """Inputs with a few large channels and correlated features, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(tokens, k, generator=gen) @ (torch.eye(k) + mix)
    x[:, :4] *= 20  # outlier channels
    return x


def output_error(x, w, wq):
    return (x @ w.t() - x @ wq.t()).pow(2).mean().item()


def test_gptq_beats_rtn_on_the_layer_output_error():
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    h = gptq.HessianAccumulator(128)
    for chunk in x.split(100):
        h.add(chunk)
    torch.testing.assert_close(h.hessian(), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    for spec in (QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, None, True)):
        base = output_error(x, w, rtn(w, spec).dequantize())
        for act_order in (False, True):
            got = gptq.gptq(w, h.hessian(), spec, act_order=act_order)
            assert got.q.min() >= spec.qmin and got.q.max() <= spec.qmax
            assert output_error(x, w, got.dequantize()) < 0.8 * base, (spec, act_order)


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(4, 32, True)
    got = gptq.gptq(w, torch.eye(64), spec, damp=0.01)
    assert torch.equal(got.q, rtn(w, spec).q)


def test_gptq_gives_dead_inputs_zero_weight():
    x = correlated_inputs(k=64)
    x[:, 7] = 0
    h = gptq.HessianAccumulator(64)
    h.add(x)
    got = gptq.gptq(torch.randn(32, 64), h.hessian(), QuantSpec(8, None, True))
    assert (got.q[:, 7] == 0).all()


def test_awq_scales_reduce_the_quantized_output_error():
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(4, 32, True)
    s = awq.search_scales(x, [w], spec)
    scaled = rtn(w * s, spec).dequantize() / s
    assert output_error(x, w, scaled) < output_error(x, w, rtn(w, spec).dequantize())


@pytest.mark.parametrize("config", [W8A8(method="smoothquant"), W4A16(method="awq")])
def test_smoothing_and_awq_scales_leave_the_float_model_unchanged(model, calibration, config):
    """SmoothQuant and AWQ fold their scales into the norms (and up_proj): an exact transform in fp32."""
    ids = calibration[:2]
    with torch.no_grad():
        before = model(ids)
    norms = [layer.input_layernorm.weight.clone() for layer in model.model.layers]
    runner = LayerByLayer(model, calibration)
    names = [n for group in LINEAR_GROUPS.values() for n in group]
    for _, layer in runner.layers():
        _rescale_layer(layer, names, runner, config, config.spec())
        runner.run(layer, advance=True)
    with torch.no_grad():
        after = model(ids)
    assert not torch.allclose(norms[0], model.model.layers[0].input_layernorm.weight)  # scales were applied
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_smoothquant_scales_follow_the_formula():
    act_max, w = torch.tensor([8.0, 1.0, 0.5]), torch.tensor([[1.0, 2.0, 0.5], [-2.0, 1.0, 0.25]])
    s = smoothquant.smoothing_scales(act_max, [w], alpha=0.5)
    torch.testing.assert_close(s, (act_max / torch.tensor([2.0, 2.0, 0.5])).sqrt())
    stat = smoothquant.ChannelMax(3)
    stat.add(torch.tensor([[1.0, -3.0, 0.0]]))
    stat.add(torch.tensor([[-2.0, 1.0, 0.5]]))
    assert stat.value.tolist() == [2.0, 3.0, 0.5]
