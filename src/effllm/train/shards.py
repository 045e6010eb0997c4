"""Pre-tokenized shards cached on disk: one per data file, read back as numpy memmaps.

A shard is `KEY.tokens` (uint16, or uint32 for vocabularies over 65535 ids), `KEY.mask` (uint8, only when
some tokens carry no loss) and `KEY.json`, written last, which marks the shard complete. KEY hashes the
file's path, size and modification time with the tokenizer's files, so an edited file or another
tokenizer gets a new shard and a finished shard is never rebuilt. Tokens stream to disk as they are
encoded, so a corpus larger than memory is fine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effllm.train.encoding import RecordEncoder
from effllm.train.sources import iter_records

SHARD_FORMAT = 1
FLUSH_TOKENS = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@dataclass
class Shard:
    tokens: np.ndarray  # [n] token ids (a read-only memmap)
    mask: np.ndarray | None  # [n] 1 where the token is a loss target; None: all are
    n_targets: int  # tokens the loss is taken on

    def __len__(self) -> int:
        return len(self.tokens)


def tokenizer_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of the files that decide how text tokenizes."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def shard_key(file: Path, fingerprint: str, text_field: str) -> str:
    stat = file.stat()
    ident = [SHARD_FORMAT, str(file.resolve()), stat.st_size, stat.st_mtime_ns, fingerprint, text_field]
    return f"{file.stem[:40]}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}"


def shard_complete(cache_dir: Path, key: str) -> bool:
    return (cache_dir / f"{key}.json").is_file()


def build_shard(
    file: Path, encoder: RecordEncoder, cache_dir: Path, key: str, vocab_size: int, text_field: str = "text"
) -> None:
    """Tokenize `file` into the shard `key` (temporary files, renamed into place, metadata last)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = f".{os.getpid()}.tmp"
    tokens_path, mask_path = cache_dir / f"{key}.tokens", cache_dir / f"{key}.mask"
    n_tokens = n_targets = 0
    masked = False
    ids_buf: list[int] = []
    mask_buf: list[int] = []
    with open(f"{tokens_path}{tmp}", "wb") as tf, open(f"{mask_path}{tmp}", "wb") as mf:

        def flush() -> None:
            np.asarray(ids_buf, dtype=dtype).tofile(tf)
            np.asarray(mask_buf, dtype=np.uint8).tofile(mf)
            ids_buf.clear()
            mask_buf.clear()

        for record in iter_records(file, text_field):
            ids, mask = encoder.encode(record)
            ids_buf.extend(ids)
            mask_buf.extend([1] * len(ids) if mask is None else mask)
            masked = masked or mask is not None
            n_tokens += len(ids)
            n_targets += len(ids) if mask is None else sum(mask)
            if len(ids_buf) >= FLUSH_TOKENS:
                flush()
        flush()
        for f in (tf, mf):
            f.flush()
            os.fsync(f.fileno())
    os.replace(f"{tokens_path}{tmp}", tokens_path)
    if masked:
        os.replace(f"{mask_path}{tmp}", mask_path)
    else:
        os.unlink(f"{mask_path}{tmp}")
    meta = {
        "format": SHARD_FORMAT,
        "source": str(file),
        "n_tokens": n_tokens,
        "n_targets": n_targets,
        "dtype": np.dtype(dtype).name,
        "masked": masked,
    }
    meta_path = cache_dir / f"{key}.json"
    Path(f"{meta_path}{tmp}").write_text(json.dumps(meta, indent=2))
    os.replace(f"{meta_path}{tmp}", meta_path)


def open_shard(cache_dir: Path, key: str) -> Shard:
    """A complete shard, memory-mapped read-only."""
    meta = json.loads((cache_dir / f"{key}.json").read_text())
    n, dtype = meta["n_tokens"], np.dtype(meta["dtype"])
    if n == 0:
        return Shard(np.zeros(0, dtype=dtype), None, 0)
    tokens = np.memmap(cache_dir / f"{key}.tokens", dtype=dtype, mode="r", shape=(n,))
    mask = (
        np.memmap(cache_dir / f"{key}.mask", dtype=np.uint8, mode="r", shape=(n,)) if meta["masked"] else None
    )
    return Shard(tokens, mask, meta["n_targets"])
