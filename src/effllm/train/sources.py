"""Where training text comes from: plain text files and folders, jsonl with a text field, chat jsonl.

A plain text file is one document, read in pieces of about a megabyte (cut at line ends) so a file larger
than memory streams. A jsonl line is one document (`{"text": ...}`) or one conversation
(`{"messages": [{"role": ..., "content": ...}, ...]}`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effllm.core.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PIECE_CHARS = 1 << 20


@dataclass
class Record:
    """A piece of a document (`text`) or a whole conversation (`messages`)."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    start: bool = True  # the document starts with this piece
    end: bool = True  # ... and ends after it


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files named by `paths`: files as given, folders searched for text and jsonl files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ConfigError(
                    f"data folder {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files"
                )
            files.extend(found)
        else:
            raise ConfigError(f"data path {raw} does not exist; pass text files, folders or jsonl files")
    return files


def is_jsonl(file: Path) -> bool:
    return file.suffix.lower() in JSONL_SUFFIXES


def iter_records(file: Path, text_field: str = "text") -> Iterator[Record]:
    """The documents and conversations of one data file, in file order."""
    if is_jsonl(file):
        yield from _jsonl_records(file, text_field)
    else:
        yield from _text_pieces(file)


def iter_texts(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """All text of `files` (message contents for chat), e.g. to train a tokenizer on."""
    for file in files:
        for record in iter_records(file, text_field):
            if record.text is not None:
                yield record.text
            else:
                yield from (str(m.get("content") or "") for m in record.messages or ())


def _text_pieces(file: Path) -> Iterator[Record]:
    piece: list[str] = []
    size = 0
    start = True
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if size >= PIECE_CHARS:
                yield Record(text="".join(piece), start=start, end=False)
                piece, size, start = [], 0, False
            piece.append(line)
            size += len(line)
    if piece:
        yield Record(text="".join(piece), start=start, end=True)


def _jsonl_records(file: Path, text_field: str) -> Iterator[Record]:
    with open(file, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{file}:{lineno} is not valid JSON ({e.msg}); fix the line or remove it"
                ) from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{file}:{lineno} must be a JSON object with {text_field!r} or 'messages'")
            if "messages" in obj:
                yield Record(messages=_check_messages(obj["messages"], file, lineno))
            elif isinstance(obj.get(text_field), str):
                yield Record(text=obj[text_field])
            else:
                raise ConfigError(
                    f"{file}:{lineno} has no string field {text_field!r} and no 'messages'; "
                    "set --text-field to the field that holds the text"
                )


def _check_messages(messages: Any, file: Path, lineno: int) -> list[dict[str, Any]]:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
            for m in messages
        )
    )
    if not ok:
        raise ConfigError(
            f"{file}:{lineno}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    return messages
