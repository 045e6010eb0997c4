"""eDKM's memory saving for DKM (Cho et al. 2023), on any device: the tensors DKM's forward saves for the
backward, stored once per distinct weight value.

DKM's soft assignment of n weights to k centroids saves several [n, k] maps per k-means iteration
(distances, the softmax, the clamped attention) for the backward: for a 4096 x 4096 matrix and 16 centroids
that is 1 GiB per map. eDKM's observation is that a 16-bit weight takes at most 2^16 values, and every
row of those maps is a function of its weight's value alone, so the map is its rows for the distinct
values ([u, k], u <= 65536) plus one index per weight, shared by every map of the matrix
(*uniquification*); a tensor saved by several operations is stored once (*deduplication*); and what is
stored may be moved to another device until the backward needs it (*marshaling*: `offload="cpu"` frees
accelerator memory; on the CPU it is a no-op). The stored rows are copies of the originals, so the
backward computes exactly what it would have (tested bit for bit). The paper's CUDA-only details
(its tensor marshaling by storage pointer across devices, sharding for multi-GPU) become these
`torch.autograd.graph.saved_tensors_hooks`, which run wherever torch runs.

    with SavedMapCompression(values=x16) as saved:   # x16: the matrix's 16-bit weight values
        ... DKM's forward on x16 ...
    saved.stats  # {"saved_bytes": what the graph would hold, "stored_bytes": what it holds}
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


@dataclass
class _Stored:
    tensor: torch.Tensor  # the tensor, or its rows for the distinct values
    device: torch.device
    unique: bool


@dataclass
class SavedStats:
    saved_bytes: int = 0  # what the graph would hold: the storages of the saved tensors, each once
    stored_bytes: int = 0  # what it holds on the tensors' own device(s)
    offloaded_bytes: int = 0  # what it holds on the offload device
    tensors: int = 0
    uniquified: int = 0
    deduplicated: int = 0
    _storages: dict = field(default_factory=dict, repr=False)
    _kept: set = field(default_factory=set, repr=False)

    def ratio(self) -> float:
        """How many times less the graph holds on the tensors' devices."""
        return self.saved_bytes / max(1, self.stored_bytes)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SavedMapCompression(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for one matrix's DKM forward: [n, ...] float tensors (n = `values.numel()`) are
    stored as their rows for `values`' distinct entries plus a shared index; repeats are stored once; and
    everything stored goes to `offload` (a device) when given. Only tensors whose rows are functions of the
    weight's value may be saved inside (DKM's maps are: each row is computed from one weight and the
    centroids)."""

    def __init__(self, values: torch.Tensor, offload: str | torch.device | None = None):
        flat = values.detach().reshape(-1)
        self.rows = flat.numel()
        unique, inverse = torch.unique(flat, return_inverse=True)
        first = torch.full((unique.numel(),), self.rows, dtype=torch.long, device=flat.device)
        first.scatter_reduce_(0, inverse, torch.arange(self.rows, device=flat.device), reduce="amin")
        self.first = first  # one weight of each distinct value
        self.offload = None if offload is None else torch.device(offload)
        small = torch.int32 if unique.numel() < 2**31 else torch.long
        self.inverse = self._away(inverse.to(small))  # stored once, shared by every map
        self.stats = SavedStats()
        if self.inverse.device == flat.device:
            self.stats.stored_bytes += _bytes(self.inverse)
        else:
            self.stats.offloaded_bytes += _bytes(self.inverse)
        self._seen: dict[tuple, tuple[weakref.ref, _Stored]] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> SavedMapCompression:
        super().__enter__()
        return self

    def _away(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.offload is None or t.device == self.offload else t.to(self.offload)

    def _pack(self, t: torch.Tensor) -> _Stored:
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            t._version,
        )
        seen = self._seen.get(key)
        # the same tensor saved again (alive: an address freed and reused by another tensor is not a repeat)
        if seen is not None and seen[0]() is t:
            self.stats.deduplicated += 1
            return seen[1]
        storage = t.untyped_storage()
        owner = self.stats._storages.get(storage.data_ptr())
        if owner is None or owner() is None:  # a storage not counted yet (or a freed one's address reused)
            self.stats._storages[storage.data_ptr()] = weakref.ref(t)
            self.stats.saved_bytes += storage.nbytes()
        self.stats.tensors += 1
        if (
            t.is_floating_point()
            and t.dim() >= 1
            and t.shape[0] == self.rows
            and self.first.numel() < self.rows
        ):
            stored = _Stored(self._away(t[self.first].contiguous()), t.device, True)
            self.stats.uniquified += 1
        elif self.offload is not None and t.device != self.offload:
            stored = _Stored(t.to(self.offload), t.device, False)
        else:  # kept as it is: its storage stays alive
            stored = _Stored(t, t.device, False)
            if storage.data_ptr() not in self.stats._kept:
                self.stats._kept.add(storage.data_ptr())
                self.stats.stored_bytes += storage.nbytes()
            self._seen[key] = (weakref.ref(t), stored)
            return stored
        if stored.tensor.device == t.device:
            self.stats.stored_bytes += _bytes(stored.tensor)
        else:
            self.stats.offloaded_bytes += _bytes(stored.tensor)
        self._seen[key] = (weakref.ref(t), stored)
        return stored

    def _unpack(self, stored: _Stored) -> torch.Tensor:
        t = stored.tensor.to(stored.device)
        if not stored.unique:
            return t
        return t[self.inverse.to(stored.device)]
