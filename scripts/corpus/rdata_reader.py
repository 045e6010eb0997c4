"""Read the character vectors of an R package's lazy-load data base (data/Rdata.rdx + Rdata.rdb), no R needed.

An R package built with `LazyData: true` keeps its data sets in two files:
- `Rdata.rdx`: a gzip'd R serialization of a list; its `variables` element maps each data set's name to
  (offset, length) in the .rdb file.
- `Rdata.rdb`: the data sets, each a 4-byte big-endian uncompressed size followed by a zlib stream of that
  data set's R serialization.
R serialization ("XDR" format, R Internals §1.8) is a tree of items, each led by a 32-bit flags word. This
reader covers the item types that data sets of text use: character, logical, integer, double and generic
vectors, pairlists (for attributes), symbols and back-references. Anything else raises `ValueError`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_INTEGER = -(2**31)
UTF8_MASK, LATIN1_MASK = 1 << 3, 1 << 2


class RList(list):
    """An R vector with its attributes (e.g. `names`)."""

    def __init__(self, items, attributes=None):
        super().__init__(items)
        self.attributes = attributes or {}

    def as_dict(self) -> dict:
        return dict(zip(self.attributes["names"], self, strict=True))


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization (expected 'X\\n')")
        version = self.int()
        self.int(), self.int()  # writer's R version, oldest reader that can read it
        if version == 3:
            self.bytes(self.int())  # the writer's native encoding
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported")

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE_SXP, NILSXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            return self.charsxp(flags >> 12)
        if kind == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if kind in (STRSXP, VECSXP, LGLSXP, INTSXP, REALSXP):
            values = self.vector(kind)
            attributes = self.item() if has_attr else {}
            return RList(values, attributes)
        raise ValueError(f"R item type {kind} is not supported by this reader")

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.bytes(n)
        return raw.decode("latin-1" if levels & LATIN1_MASK and not levels & UTF8_MASK else "utf-8")

    def vector(self, kind: int) -> list:
        n = self.int()
        if kind in (STRSXP, VECSXP):
            return [self.item() for _ in range(n)]
        if kind == REALSXP:
            values = struct.unpack_from(f">{n}d", self.data, self.pos)
            self.pos += 8 * n
            return list(values)
        values = struct.unpack_from(f">{n}i", self.data, self.pos)
        self.pos += 4 * n
        return [None if v == NA_INTEGER else v for v in values]

    def pairlist(self, has_attr: int, has_tag: int) -> dict:
        """A pairlist (attributes are one) as {tag: value}; the chain is read iteratively."""
        out = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else len(out)
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF != LISTSXP:
                if flags & 0xFF not in (NILVALUE_SXP, NILSXP):
                    raise ValueError("a pairlist that does not end in NULL is not supported")
                return out
            has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)


def unserialize(data: bytes):
    """The R object serialized (XDR format) in `data`."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazy_load_db(folder: str | Path) -> dict:
    """{name: object} for every data set in `folder`/Rdata.rdx + Rdata.rdb."""
    folder = Path(folder)
    index = unserialize(gzip.decompress((folder / "Rdata.rdx").read_bytes())).as_dict()
    blob = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].as_dict().items():
        record = blob[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack_from(">I", record)
        data = zlib.decompress(record[4:])
        if len(data) != size:
            raise ValueError(f"{name}: inflated to {len(data)} bytes, the header says {size}")
        out[name] = unserialize(data)
    return out
