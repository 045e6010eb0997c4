"""Read the text of a SWORD module (zText / zCom, OSIS markup) as plain prose, without the SWORD library.

A compressed SWORD module stores each testament as three files: `<t>.bzz` holds zlib-compressed blocks of
verse texts, `<t>.bzs` indexes them (one little-endian (offset, compressed size, uncompressed size) triple of
u32 per block), and `<t>.bzv` indexes verses within the blocks. The verses lie in canonical order inside
consecutive blocks, so reading every block in order gives the whole text; the verse index is not needed.

The markup is OSIS XML split across verses (so it is not well formed per block). `osis_to_text` keeps the
prose: footnotes (`<note>`), titles, tables (chapter outlines) and cross-reference lists go; paragraph ends
become line breaks; Strong's-number word tags (`<w>`) are unwrapped; typographic quotes and dashes become
the ASCII forms of the Austen corpus (" ' --).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

_DROP = re.compile(r"<(note|title|table|rdg)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_PARAGRAPH = re.compile(
    r'<div\b[^>]*\beID="[^"]*"[^>]*type="(x-p|paragraph|introduction)"[^>]*/>|<lb\b[^>]*/>|</l>|<p>|</p>'
)
_TAG = re.compile(r"<[^>]*>")
_TYPOGRAPHY = str.maketrans(
    {
        "\u201c": '"',
        "\u201d": '"',
        "\u2018": "'",
        "\u2019": "'",
        "\u2014": "--",
        "\u2013": "-",
        "\u00a0": " ",
        "\u2026": "...",
    }
)


def read_blocks(folder: Path, testament: str) -> str:
    """The concatenated, decompressed blocks of one testament ("ot" or "nt") of a zText/zCom module."""
    index = (folder / f"{testament}.bzs").read_bytes()
    data = (folder / f"{testament}.bzz").read_bytes()
    if len(index) % 12:
        raise ValueError(f"{folder}/{testament}.bzs: size {len(index)} is not a multiple of 12")
    parts = []
    for i in range(len(index) // 12):
        offset, size, usize = struct.unpack_from("<III", index, 12 * i)
        block = zlib.decompress(data[offset : offset + size])
        if len(block) != usize:
            raise ValueError(f"{folder}/{testament}.bzz block {i}: {len(block)} bytes, index says {usize}")
        parts.append(block)
    return b"".join(parts).decode("utf-8")


def osis_to_text(osis: str) -> str:
    """Plain prose from OSIS markup: one paragraph per line, single spaces, ASCII quotes and dashes."""
    text = _DROP.sub(" ", osis)
    text = _PARAGRAPH.sub("\n", text)
    text = _TAG.sub("", text)
    text = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    text = text.translate(_TYPOGRAPHY)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line) + "\n"


def module_text(folder: Path) -> str:
    """The whole module (Old Testament, then New) as plain prose."""
    return "".join(
        osis_to_text(read_blocks(folder, t)) for t in ("ot", "nt") if (folder / f"{t}.bzs").exists()
    )
