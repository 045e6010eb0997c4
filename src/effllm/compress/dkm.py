"""DKM: differentiable k-means weight clustering (Cho et al. 2022), as coremltools' `DKMPalettizer` runs it.

    dkm_modules = apply_dkm(model, bits=3)       # every decoder linear's weight becomes a parametrization
    ... train ...                                 # the forward sees softly clustered weights
    finalize_dkm(model)                           # each weight snapped to its nearest of 2^bits centroids

A palettized weight matrix holds only 2^bits distinct values (a codebook, or "palette"), so it can be
stored as the palette plus a `bits`-bit index per weight. DKM learns it in training: each weight W (as a
column of scalars, coremltools' `cluster_dim` 1, one palette per matrix) is softly assigned to the
centroids C, and the assignment and the centroids are refined for a few k-means iterations inside the
forward, differentiably (`fake_palettize.py::diff_palettize_seq`):

    repeat up to `iters` times:  D = (w - c)^2 (less 1e-7 for c_0),  A = softmax(-D / tau).clamp(min 1e-7),  C = A^T w / sum(A)
    (stop early once the inertia sum(min D) moves by at most `epsilon`)
    W~ = A C                     # what the layer multiplies with; gradients reach W through A and C

The centroids carry over from step to step (detached), initialised by k-means++ and Lloyd's iterations on
the weights at the first training forward. In eval mode the weight is the hard palette: each weight takes
its nearest centroid. tau (coremltools' `palett_tau`, 1e-4) sets how soft the assignment is; as tau -> 0
the soft weights become the hard ones (tested). `edkm=True` adds eDKM's memory saving (`compress/edkm.py`).
What is not here: coremltools' splitting of duplicate centroids, per-channel scales, vector clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from effllm.core.errors import ConfigError

ZERO_THRESHOLD = 1e-7  # coremltools' clamp on the soft assignment
# coremltools' default `prune_threshold`: the first centroid's distances are lowered by it (meant for a zero
# centroid when pruning). Kept so that the clustering matches the peer's to rounding.
PRUNE_THRESHOLD = 1e-7


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """k centroids of the values `x` (any shape): k-means++ seeding, then Lloyd's iterations; sorted."""
    values = x.detach().float().flatten()
    if values.numel() < k:
        raise ConfigError(f"{values.numel()} weights cannot make {k} clusters")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = (
        values if values.numel() <= 65536 else values[torch.randperm(values.numel(), generator=gen)[:65536]]
    )
    centroids = [sample[torch.randint(sample.numel(), (1,), generator=gen)].item()]
    for _ in range(k - 1):
        d = (sample[:, None] - torch.tensor(centroids)[None]).square().min(dim=1).values
        centroids.append(sample[torch.multinomial(d + 1e-30, 1, generator=gen)].item())
    c = torch.tensor(centroids)
    for _ in range(iters):
        labels = (sample[:, None] - c[None]).square().argmin(dim=1)
        sums = torch.zeros(k).index_add_(0, labels, sample)
        counts = torch.zeros(k).index_add_(0, labels, torch.ones_like(sample))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c.sort().values.to(x.device)


def soft_palettize(
    w: torch.Tensor, centroids: torch.Tensor, tau: float, iters: int = 3, epsilon: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM's differentiable clustering of `w` from `centroids` [k]: (W~ shaped as w, the new centroids)."""
    x = w.reshape(-1, 1)
    c = centroids.to(w.dtype).reshape(-1, 1).clone()  # the caller may overwrite its centroids in place
    last = None
    attention = None
    for _ in range(iters):
        distance = torch.cdist(x, c).square()  # [n, k]
        distance[:, :1] -= PRUNE_THRESHOLD
        attention = F.softmax(-distance / tau, dim=-1).clamp(min=ZERO_THRESHOLD)
        c = (x.T @ attention).T / attention.sum(dim=0).view(-1, 1)
        inertia = float(distance.detach().min(dim=-1).values.sum())
        if last is not None and abs(last - inertia) <= epsilon:
            break
        last = inertia
    return (attention @ c).view(w.shape), c.view(-1)


def hard_palettize(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each weight replaced by its nearest centroid."""
    c = centroids.to(w.dtype).reshape(-1)
    distance = (w.reshape(-1, 1) - c[None]).square()
    distance[:, :1] -= PRUNE_THRESHOLD
    return c[distance.argmin(dim=1)].view(w.shape)


class DKMWeight(nn.Module):
    """The parametrization of a weight: soft clusters in training, the hard palette in eval.

    With `edkm`, eDKM's setting (`compress/edkm.py`): the weights are clustered as the bfloat16 values a
    16-bit layer multiplies with (the rounding passes gradients straight through), so a matrix takes at
    most 2^16 distinct values, and the maps the soft assignment saves for the backward are stored once per
    distinct value (and on the CPU while the weights sit on an accelerator). `last_saved` holds the
    saved-tensor figures of the latest training forward."""

    def __init__(
        self,
        bits: int,
        tau: float = 1e-4,
        iters: int = 3,
        epsilon: float = 1e-4,
        seed: int = 0,
        edkm: bool = False,
    ):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ConfigError(f"--dkm-bits must be in [1, 8], got {bits}")
        if tau <= 0 or iters < 1:
            raise ConfigError(f"DKM needs tau > 0 and at least one iteration, got tau {tau}, iters {iters}")
        self.bits, self.tau, self.iters, self.epsilon, self.seed = bits, tau, iters, epsilon, seed
        self.edkm = self.compress_saved = (
            edkm  # compress_saved off: eDKM's values without its hooks (ablation)
        )
        self.last_saved = None
        self.register_buffer("centroids", torch.zeros(2**bits))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def clustered(self, w: torch.Tensor) -> torch.Tensor:
        """The values clustered: the weights, or (eDKM) their bfloat16 roundings, gradients straight through."""
        if not self.edkm or w.element_size() <= 2:
            return w
        return w + (w.to(torch.bfloat16).to(w.dtype) - w).detach()  # gradients pass in w's precision

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = self.clustered(w)
        if not bool(self.initialised):
            with torch.no_grad():
                self.centroids.copy_(kmeans_1d(w, 2**self.bits, seed=self.seed))
                self.initialised.fill_(True)
        if not self.training:
            return hard_palettize(w, self.centroids)
        if self.edkm and self.compress_saved and torch.is_grad_enabled():
            from effllm.compress.edkm import SavedMapCompression

            with SavedMapCompression(w, offload=None if w.device.type == "cpu" else "cpu") as saved:
                palettized, centroids = soft_palettize(w, self.centroids, self.tau, self.iters, self.epsilon)
            self.last_saved = saved.stats
        else:
            palettized, centroids = soft_palettize(w, self.centroids, self.tau, self.iters, self.epsilon)
        with torch.no_grad():
            self.centroids.copy_(centroids.detach())
        return palettized


def dkm_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's linears (embeddings, norms and the head keep full precision, as in the paper)."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"
    }


def apply_dkm(
    model: nn.Module, bits: int, tau: float = 1e-4, iters: int = 3, seed: int = 0, edkm: bool = False
) -> int:
    """Register a `DKMWeight` on every decoder linear's weight (in place); returns how many."""
    targets = dkm_targets(model)
    if not targets:
        raise ConfigError("the model has no decoder linears to palettize")
    for i, module in enumerate(targets.values()):
        parametrize.register_parametrization(
            module, "weight", DKMWeight(bits, tau, iters, seed=seed + i, edkm=edkm)
        )
    return len(targets)


@torch.no_grad()
def finalize_dkm(model: nn.Module) -> dict[str, int]:
    """Replace every DKM parametrization by its hard palette (plain weights again); returns, per module, how
    many distinct values its weight holds (at most 2^bits)."""
    counts = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and isinstance(
            module.parametrizations.weight[0], DKMWeight
        ):
            dkm = module.parametrizations.weight[0]
            dkm.eval()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            counts[name] = int(module.weight.unique().numel())
    return counts
