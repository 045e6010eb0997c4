"""GPT-2's byte-level alphabet: the printable character that stands for each byte in byte-level BPE vocabularies."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, the alphabet of byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
