"""One-shot pruning: exact counts, Wanda's and SparseGPT's defining properties, and test-local
transcriptions of the reference code (locuslab/wanda `prune_wanda`, IST-DASLab/sparsegpt `fasterprune`)."""

import pytest
import torch

from effllm.compress.gptq import HessianAccumulator
from effllm.compress.prune import (
    Pattern,
    magnitude_mask,
    nm_mask,
    prune_,
    sparsegpt,
    wanda_mask,
)
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig
from effllm.models.transformer import CausalLM


def weights(n=24, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def inputs(t=200, k=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, k, generator=gen) * torch.rand(k, generator=gen) * 3


def hessian(x):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian()


def test_pattern_parsing():
    assert Pattern.parse("2:4") == Pattern(2, 4) and not Pattern.parse("unstructured").structured
    for bad in ("4:2", "0:4", "2-4", "half"):
        with pytest.raises(ConfigError, match="N:M"):
            Pattern.parse(bad)


def test_exact_counts():
    w = weights()
    norms = inputs().norm(dim=0)
    assert (wanda_mask(w, norms, 0.5, Pattern()).sum(1) == 32).all()  # per row: int(64 * 0.5)
    nm = wanda_mask(w, norms, 0.0, Pattern(2, 4)).reshape(24, 16, 4)
    assert (nm.sum(-1) == 2).all()  # 2 of every 4 consecutive inputs
    assert (nm_mask(w.abs(), Pattern(4, 8)).reshape(24, 8, 8).sum(-1) == 4).all()
    # Magnitude and SparseGPT keep the references' `<=` threshold at index int(numel * s): one more.
    assert int(magnitude_mask(w, 0.5, Pattern()).sum()) == 24 * 32 + 1
    pruned = sparsegpt(w, hessian(inputs()), 0.5)
    assert int((pruned == 0).sum()) == 24 * 32 + 1  # one block of 64 columns
    assert (sparsegpt(w, hessian(inputs()), 0.0, Pattern(2, 4)) == 0).reshape(24, 16, 4).sum(-1).eq(2).all()


def test_wanda_with_identity_inputs_is_per_row_magnitude_and_ignores_input_scale():
    w, x = weights(), inputs()
    ones = torch.eye(64).norm(dim=0)  # X = I: every input norm is 1
    by_row = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().argsort(dim=1)[:, :32], True)
    assert torch.equal(wanda_mask(w, ones, 0.5, Pattern()), by_row)
    norms = x.norm(dim=0)
    assert torch.equal(wanda_mask(w, norms, 0.5, Pattern()), wanda_mask(w, 7.5 * norms, 0.5, Pattern()))


def reference_sparsegpt(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt `SparseGPT.fasterprune`, transcribed (no quantizer)."""
    W = W.clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = (
                    W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                )
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            W1[:, i] = q  # the reference keeps Q1[:, i] = q; W1's column i is overwritten by Q1 at the end
            Err1[:, i] = err1
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_sparsegpt_matches_the_reference_and_beats_the_same_mask_without_updates(pattern):
    w, x = weights(k=192), inputs(k=192)
    h = hessian(x)
    ours = sparsegpt(w, h, 0.5, pattern)
    torch.testing.assert_close(
        ours, reference_sparsegpt(w, h, 0.5, pattern.n, pattern.m), rtol=1e-5, atol=1e-5
    )
    masked = torch.where(ours == 0, torch.zeros_like(w), w)  # the same mask, no OBS update
    assert (x @ (w - ours).T).norm() < (x @ (w - masked).T).norm()
    torch.testing.assert_close(sparsegpt(w, h, 0.0), w)  # sparsity 0: unchanged


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return CausalLM(config).eval()


def reference_wanda(model, ids, sparsity, prune_n=0, prune_m=0):
    """locuslab/wanda `prune_wanda`, transcribed: per layer, hook every linear, one forward of the unpruned
    layer, scaler_row = sum ||x_j||^2 / nsamples, prune by |W| * sqrt(scaler_row), then rerun the pruned layer."""
    stack = model.model
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        hidden = stack.embed_tokens(ids)
        cos, sin = stack.rotary_emb(positions, hidden.dtype)
        for layer in stack.layers:
            names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
            rows = {n: torch.zeros(layer.get_submodule(n).in_features) for n in names}
            counts = dict.fromkeys(names, 0)

            def hook(name, rows=rows, counts=counts):
                def fn(module, args, out):
                    inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
                    batch = args[0].shape[0]
                    rows[name] *= counts[name] / (counts[name] + batch)
                    counts[name] += batch
                    rows[name] += torch.norm(inp, p=2, dim=1) ** 2 / counts[name]

                return fn

            handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
            layer(hidden, cos, sin)
            for h in handles:
                h.remove()
            for n in names:
                W = layer.get_submodule(n).weight
                metric = W.abs() * torch.sqrt(rows[n].reshape(1, -1))
                mask = torch.zeros_like(metric) == 1
                if prune_n != 0:
                    for ii in range(metric.shape[1]):
                        if ii % prune_m == 0:
                            tmp = metric[:, ii : (ii + prune_m)].float()
                            mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                else:
                    sort_res = torch.sort(metric, dim=-1, stable=True)
                    indices = sort_res[1][:, : int(metric.shape[1] * sparsity)]
                    mask.scatter_(1, indices, True)
                W[mask] = 0
            hidden = layer(hidden, cos, sin)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_on_a_model_matches_the_reference(pattern):
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    ours, theirs = tiny_model(), tiny_model()
    prune_(ours, "wanda", 0.5, pattern, calibration=ids, progress=False)
    p = Pattern.parse(pattern)
    reference_wanda(theirs, ids, 0.5, p.n, p.m)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_reaches_the_sparsity_and_checks_its_input(method):
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    model = tiny_model()
    head = model.lm_head.weight.clone()
    zeros = prune_(model, method, 0.5, "4:8", calibration=ids, progress=False)
    assert len(zeros) == 2 * 7 and all(z == pytest.approx(0.5) for z in zeros.values())
    assert torch.equal(model.lm_head.weight, head)  # the head and embeddings are not pruned
    assert torch.isfinite(model(ids)).all()
    with pytest.raises(ConfigError, match="unknown pruning method"):
        prune_(model, "random", 0.5)
    with pytest.raises(ConfigError, match="divisible by 3"):
        prune_(model, "magnitude", 0.0, "1:3")
    if method != "magnitude":
        with pytest.raises(ConfigError, match="needs calibration"):
            prune_(model, method, 0.5)
