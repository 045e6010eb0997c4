"""The shipped text corpus: public-domain books, xz-compressed under effllm/assets/corpus/.

scripts/corpus/build_corpus.py extracts them from Debian packages and writes manifest.json (each book's
sha256, split and source package). Training uses every book but the held-out one (*Persuasion*), which
perplexity and the cloze set measure.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from functools import cache
from pathlib import Path

from effllm.core.errors import InputError

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"


@cache
def manifest() -> dict:
    """manifest.json: {"heldout": name, "sources": {package: provenance}, "books": {name: entry}}."""
    file = CORPUS_DIR / "manifest.json"
    if not file.is_file():
        raise InputError(f"{file} is missing; rebuild it with scripts/corpus/build_corpus.py")
    return json.loads(file.read_text(encoding="utf-8"))


def book_names(split: str | None = None) -> list[str]:
    """Names of the shipped books, in manifest order; only those of `split` ("train" or "heldout") if given."""
    books = manifest()["books"]
    return [name for name, entry in books.items() if split is None or entry["split"] == split]


@cache
def book_text(name: str) -> str:
    """The UTF-8 text of one book, checked against the manifest's sha256."""
    books = manifest()["books"]
    if name not in books:
        raise InputError(f"no book {name!r} in the corpus; choose one of {', '.join(books)}")
    data = lzma.decompress((CORPUS_DIR / books[name]["file"]).read_bytes())
    if hashlib.sha256(data).hexdigest() != books[name]["sha256"]:
        raise InputError(
            f"{books[name]['file']} does not match its sha256 in manifest.json; rebuild the corpus"
        )
    return data.decode("utf-8")


def training_text() -> str:
    """Every training book (all but the held-out one), joined by a blank line."""
    return "\n".join(book_text(name) for name in book_names("train"))


def heldout_text() -> str:
    """The held-out book (*Persuasion*)."""
    return book_text(manifest()["heldout"])
