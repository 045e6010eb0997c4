"""Packing a token stream into fixed-length sequences, the held-out split and the shuffled order.

The shards, concatenated, are one stream of N tokens. Sequence k holds tokens [k*T, k*T + T] (T + 1 of
them: T inputs and their next-token labels), so there are (N - 1) // T sequences and only the stream's
tail is unused. Which sequences are held out and the order of each epoch are pure functions of the seed,
so every process, and every resumed run, sees the same data in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from effllm.train.shards import Shard

IGNORE_INDEX = -100  # label of a token the loss skips (torch cross_entropy's default ignore_index)


class TokenStream:
    """Shards read as one concatenated stream."""

    def __init__(self, shards: Sequence[Shard]):
        self.shards = [s for s in shards if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # [n_shards + 1]
        self.masked = any(s.mask is not None for s in self.shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) as int64, and their loss mask as bool."""
        ids, mask = [], []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            shard, offset = self.shards[i], start - int(self.starts[i])
            n = min(length, len(shard) - offset)
            ids.append(np.asarray(shard.tokens[offset : offset + n], dtype=np.int64))
            mask.append(np.ones(n, dtype=bool) if shard.mask is None else shard.mask[offset : offset + n] > 0)
            start, length, i = start + n, length - n, i + 1
        return np.concatenate(ids), np.concatenate(mask)


class PackedSequences:
    """The stream cut into sequences of `seq_len` inputs with their shifted labels."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(len(self.stream) - 1, 0) // self.seq_len

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """input_ids and labels, each [len(indices), seq_len]; labels are IGNORE_INDEX off the loss mask."""
        t = self.seq_len
        inputs = np.empty((len(indices), t), dtype=np.int64)
        labels = np.empty((len(indices), t), dtype=np.int64)
        for row, k in enumerate(indices):
            ids, mask = self.stream.read(int(k) * t, t + 1)
            inputs[row] = ids[:-1]
            labels[row] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sequence indices: a seeded random `eval_fraction` of them held out (at least one)."""
    if eval_fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class ShuffledOrder:
    """An endless order over `indices`: epoch e is a seeded permutation; sample i is in epoch i // n."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices = indices
        self.seed = seed
        self._epoch = -1
        self._perm = indices

    def __getitem__(self, i: int) -> int:
        epoch, pos = divmod(i, len(self.indices))
        if epoch != self._epoch:
            self._perm = self.indices[
                np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            ]
            self._epoch = epoch
        return int(self._perm[pos])
