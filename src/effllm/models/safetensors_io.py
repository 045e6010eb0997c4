"""Reading safetensors files tensor by tensor, straight into the destination memory.

`safetensors` maps the whole file and copies out of the mapping; while the file is open the mapped pages
count towards resident memory, so a loader could hold the checkpoint twice. Reading each tensor with
`readinto` into its final buffer keeps peak memory at the model's size plus one tensor, and lets us check
the header against the file size to report truncation clearly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from effllm.core.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file and the offset where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{path} has a corrupt safetensors header; re-download or re-save it"
            ) from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated ({size} bytes, the header needs {data_start + end}); re-download or re-save it"
        )
    return header, data_start


def iter_tensors(
    path: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one file, floating tensors cast to `dtype` when given."""
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            t = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            if t.numel() * t.element_size() != end - begin:
                raise CheckpointError(f"{path}: tensor {name} has inconsistent size; the file is corrupt")
            f.seek(data_start + begin)
            if t.numel():
                buf = t.view(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buf)) != end - begin:
                    raise CheckpointError(
                        f"{path} is truncated inside tensor {name}; re-download or re-save it"
                    )
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            if torch.device(device).type != "cpu":
                t = t.to(device)
            yield name, t
