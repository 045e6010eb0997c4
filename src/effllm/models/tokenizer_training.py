"""New tokenizers: one token per byte (no training, for tiny test models) or byte-level BPE trained on text.

Both are saved in the Hugging Face layout by `Tokenizer.save_pretrained`, with ChatML's special tokens and
chat template unless told otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from effllm.core.errors import TokenizerError
from effllm.models.byte_level import bytes_to_unicode
from effllm.models.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_byte_level_tokenizer(
    folder: str | os.PathLike | None = None,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    eos_token: str = "<|endoftext|>",
    pad_token: str | None = "<|endoftext|>",
    chat_template: str | None = CHATML_TEMPLATE,
) -> Tokenizer:
    """A tokenizer with one token per byte (ids 0-255, in byte order) and `special_tokens` after them.

    Any text encodes losslessly with no training, which suits tiny test models. Saved to `folder` if given.
    """
    alphabet = bytes_to_unicode()
    backend = tokenizers.Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    return _finish_byte_level(backend, folder, special_tokens, eos_token, pad_token, chat_template)


def train_bpe_tokenizer(
    source: str | os.PathLike | Sequence[os.PathLike] | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    *,
    min_frequency: int = 2,
    eos_token: str = "<|endoftext|>",
    pad_token: str | None = "<|endoftext|>",
    chat_template: str | None = CHATML_TEMPLATE,
    folder: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenization, all 256 bytes in the vocabulary).

    `source` is a text file (a str or Path), a list of Path objects, or an iterable of texts. The special
    tokens take the first ids. Saved to `folder` if given.
    """
    if vocab_size < 256 + len(special_tokens):
        raise TokenizerError(
            f"vocab_size {vocab_size} is below 256 bytes + {len(special_tokens)} special tokens"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    files = _training_files(source)
    if files is None:
        backend.train_from_iterator(source, trainer)
    else:
        backend.train(files, trainer)
    return _finish_byte_level(backend, folder, special_tokens, eos_token, pad_token, chat_template)


def _finish_byte_level(
    backend: tokenizers.Tokenizer,
    folder: str | os.PathLike | None,
    special_tokens: Sequence[str],
    eos_token: str,
    pad_token: str | None,
    chat_template: str | None,
) -> Tokenizer:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special_tokens]
    )
    named = {"eos_token": eos_token, "pad_token": pad_token}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    config.update({name: token for name, token in named.items() if token is not None})
    extra = [token for token in special_tokens if token not in named.values()]
    if extra:
        config["additional_special_tokens"] = extra
    tokenizer = Tokenizer(backend, config, chat_template)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def _training_files(source: Any) -> list[str] | None:
    """The files to train on, or None when `source` is an iterable of texts."""
    if isinstance(source, (str, os.PathLike)):
        paths = [Path(source)]
    elif isinstance(source, (list, tuple)) and source and all(isinstance(p, os.PathLike) for p in source):
        paths = [Path(p) for p in source]
    else:
        return None
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TokenizerError(f"training file {missing[0]} does not exist; pass existing text files")
    return [str(p) for p in paths]
