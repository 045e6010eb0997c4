"""The data of a run: files tokenized into cached shards, packed into sequences, split and ordered.

`TrainData.micro_batch(first, size)` returns the sequences `first .. first + size - 1` of the endless
shuffled order, so the data position of a run is one number: how many sequences it has consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effllm.core.errors import ConfigError, EffLLMError
from effllm.train.encoding import RecordEncoder
from effllm.train.packing import IGNORE_INDEX, PackedSequences, ShuffledOrder, TokenStream, split_indices
from effllm.train.shards import build_shard, open_shard, shard_complete, shard_key, tokenizer_fingerprint
from effllm.train.sources import find_files


@dataclass
class TrainData:
    train: PackedSequences
    order: ShuffledOrder
    held_out: PackedSequences
    held_out_indices: np.ndarray  # [n_held_out] sequence indices into `held_out`

    def micro_batch(self, first: int, size: int) -> dict[str, torch.Tensor]:
        """Training sequences first .. first + size - 1 of the shuffled order."""
        return self.train.batch([self.order[first + j] for j in range(size)])

    def held_out_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This process's share of the held-out sequences, `batch_size` at a time.

        Every process yields the same number of batches (FSDP's forward is collective): one that runs out
        of sequences pads with a batch whose labels are all ignored.
        """
        indices = self.held_out_indices
        if max_batches:
            indices = indices[: max_batches * batch_size * world_size]
        mine = indices[rank::world_size]
        n_batches = -(-len(indices) // (batch_size * world_size))
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            if len(chunk):
                yield self.held_out.batch(chunk)
            else:
                batch = self.held_out.batch(indices[:1])
                batch["labels"].fill_(IGNORE_INDEX)
                yield batch


def load_stream(
    paths: Sequence[str],
    encoder: RecordEncoder,
    tokenizer_folder: Path,
    cache_dir: Path,
    vocab_size: int,
    text_field: str = "text",
    build: bool = True,
    sync: Callable[[str | None], str | None] = lambda error: error,
    log: Callable[[str], None] = print,
) -> TokenStream:
    """The token stream of `paths`, tokenizing files whose shard is not cached yet (when `build`).

    Under torchrun one process per machine builds; `sync` waits for it and shares any error it hit, so
    that every process raises it instead of waiting forever.
    """
    files = find_files(paths)
    fingerprint = tokenizer_fingerprint(tokenizer_folder)
    keys = [shard_key(f, fingerprint, text_field) for f in files]
    error = None
    if build:
        try:
            for file, key in zip(files, keys, strict=True):
                if not shard_complete(cache_dir, key):
                    log(f"tokenizing {file}")
                    build_shard(file, encoder, cache_dir, key, vocab_size, text_field)
        except EffLLMError as e:
            error = str(e)
    error = sync(error)
    if error is not None:
        raise ConfigError(error)
    return TokenStream([open_shard(cache_dir, key) for key in keys])


def prepare_data(
    config: Any,
    tokenizer: Any,
    tokenizer_folder: Path,
    build: bool = True,
    sync: Callable[[str | None], str | None] = lambda error: error,
    log: Callable[[str], None] = print,
) -> TrainData:
    """Tokenize (or reuse) `config.data` and `config.eval_data`, pack them and fix the order.

    Raises ConfigError when the data cannot make one training sequence.
    """
    encoder = RecordEncoder(tokenizer)
    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.out) / "cache"
    common = dict(
        encoder=encoder,
        tokenizer_folder=tokenizer_folder,
        cache_dir=cache_dir,
        vocab_size=tokenizer.vocab_size,
        text_field=config.text_field,
        build=build,
        sync=sync,
        log=log,
    )
    stream = load_stream(config.data, **common)
    _check_stream(stream, config.seq_len, "--data")
    train = PackedSequences(stream, config.seq_len)
    if config.eval_data:
        held_stream = load_stream(config.eval_data, **common)
        _check_stream(held_stream, config.seq_len, "--eval-data")
        held_out = PackedSequences(held_stream, config.seq_len)
        train_idx, held_idx = np.arange(len(train)), np.arange(len(held_out))
    else:
        held_out = train
        train_idx, held_idx = split_indices(len(train), config.eval_fraction, config.seed)
    return TrainData(train, ShuffledOrder(train_idx, config.seed), held_out, held_idx)


def _check_stream(stream: TokenStream, seq_len: int, flag: str) -> None:
    n = len(stream)
    if n == 0:
        raise ConfigError(f"{flag} holds no text; pass non-empty files")
    if stream.masked and not sum(s.n_targets for s in stream.shards):
        raise ConfigError(f"{flag} has no assistant messages to learn from; chat data needs assistant turns")
    if n < seq_len + 1:
        raise ConfigError(
            f"{flag} has {n} tokens, fewer than one training sequence needs ({seq_len} + 1); "
            "lower --seq-len or add data"
        )
