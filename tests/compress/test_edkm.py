"""eDKM's saved-tensor compression: every tensor the backward reads back is bit for bit the one saved, the
maps are stored once per distinct 16-bit weight value (far fewer bytes), repeats are stored once, and a
DKM layer with `edkm` trains like DKM on the same bfloat16 values.

(The backward's gradients are compared to a tolerance, not bit for bit: DKM's `x.T @ attention` sums
131072 products in MKL, whose order depends on the operands' memory alignment, so two plain runs on this
machine already differ in the last bits now and then.)"""

import pytest
import torch

from effllm.compress.dkm import DKMWeight, kmeans_1d, soft_palettize
from effllm.compress.edkm import SavedMapCompression


def forward_backward(w16, centroids, compress, offload=None):
    w = w16.clone().requires_grad_(True)
    if compress:
        with SavedMapCompression(w, offload=offload) as saved:
            out, new = soft_palettize(w, centroids, tau=1e-4, iters=3)
    else:
        out, new, saved = *soft_palettize(w, centroids, tau=1e-4, iters=3), None
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    return out.detach(), new.detach(), w.grad, saved and saved.stats


@pytest.mark.parametrize("bits", [2, 4])
def test_what_the_backward_reads_is_what_was_saved_and_the_maps_shrink(bits, monkeypatch):
    torch.manual_seed(0)
    w16 = (torch.randn(512, 256) * 0.02).bfloat16().float()  # 131072 weights, a few thousand values
    centroids = kmeans_1d(w16, 2**bits)
    originals, pack, unpack = {}, SavedMapCompression._pack, SavedMapCompression._unpack
    read_back = []

    def recording_pack(self, t):
        stored = pack(self, t)
        originals.setdefault(id(stored), []).append(t.detach().clone())
        return stored

    def checking_unpack(self, stored):
        t = unpack(self, stored)
        read_back.append(any(torch.equal(t, o) for o in originals[id(stored)]))
        return t

    monkeypatch.setattr(SavedMapCompression, "_pack", recording_pack)
    monkeypatch.setattr(SavedMapCompression, "_unpack", checking_unpack)
    plain = forward_backward(w16, centroids, compress=False)
    compressed = forward_backward(w16, centroids, compress=True)
    assert len(read_back) >= 10 and all(read_back)
    torch.testing.assert_close(compressed[0], plain[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compressed[2], plain[2], rtol=1e-4, atol=1e-5)
    stats = compressed[3]
    assert stats.uniquified >= 3 and stats.deduplicated >= 1
    # what stays: the shared index (4 bytes a weight) and the weights themselves, next to maps of 2^bits columns
    assert stats.ratio() > 2**bits / 3, stats


def test_tensors_that_are_not_maps_of_the_weights_are_kept_as_they_are():
    w16 = torch.randn(64, 32).bfloat16().float()
    other = torch.randn(5, 7, requires_grad=True)
    with SavedMapCompression(w16) as saved:
        y = (other * 2).sin()  # sin saves its input: not a [n, ...] map, kept (no copy)
    y.sum().backward()
    assert torch.equal(other.grad, 2 * (other * 2).cos())
    assert saved.stats.tensors == 1 and saved.stats.uniquified == 0


def test_a_dkm_layer_with_edkm_trains_as_dkm_on_the_bfloat16_values():
    torch.manual_seed(0)
    weight = torch.randn(128, 64) * 0.05
    rounded = weight.bfloat16().float()
    grads = []
    for edkm, start in ((True, weight), (False, rounded)):
        layer = DKMWeight(bits=3, edkm=edkm).train()
        w = start.clone().requires_grad_(True)
        out = layer(w)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), w.grad, layer.centroids.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert layer.last_saved is None  # edkm off: no hooks
    edkm_layer = DKMWeight(bits=3, edkm=True).train()
    edkm_layer(weight.clone().requires_grad_(True))
    assert edkm_layer.last_saved.ratio() > 2


@pytest.mark.cuda
def test_marshaling_moves_what_is_stored_to_the_cpu_and_back():
    w16 = (torch.randn(256, 256, device="cuda") * 0.02).bfloat16().float()
    centroids = kmeans_1d(w16, 8).cuda()
    plain = forward_backward(w16, centroids, compress=False)
    moved = forward_backward(w16, centroids, compress=True, offload="cpu")
    torch.testing.assert_close(moved[2], plain[2], rtol=1e-4, atol=1e-5)
    assert moved[3].offloaded_bytes > 0
