"""The tokenizer: a `tokenizers.Tokenizer` with a checkpoint's special tokens and chat template.

It reads and writes the Hugging Face layout (tokenizer.json, tokenizer_config.json, chat_template.jinja), so
transformers loads what we write and we load what it writes, with the same ids, text and chat prompts.
`effllm.models.tokenizer_training` makes new ones (byte-level, or BPE trained on text).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

from effllm.core.errors import InputError, TokenizerError
from effllm.core.text import check_text
from effllm.models.chat_template import render_chat_template
from effllm.models.hub import checkpoint_file, resolve_model_path

# The named special tokens transformers passes to chat templates; a config may add its own `*_token` keys.
_STANDARD_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized", "special")


class Tokenizer:
    """Text to token ids and back, plus chat prompts; see `load_tokenizer`.

    `backend` is the `tokenizers.Tokenizer` (use it for batch work); `config` is tokenizer_config.json as
    read, kept so that `save_pretrained` writes back what it does not interpret. The special tokens the
    config names are registered with the backend as special added tokens, as transformers does.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        chat_template: str | dict[str, str] | None = None,
        generation_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        named = _named_special_tokens(self.config)
        self.special_tokens = {
            name: _added_token(value, special=True).content for name, value in named.items()
        }
        _register_added_tokens(backend, self.config, named)
        if backend.post_processor is None:
            _set_bos_eos_post_processor(backend, self.config, self.special_tokens)
        self.special_token_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        # SentencePiece byte-fallback tokens <0x00>..<0xFF>, which a decoder joins into characters.
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self.byte_token_ids = frozenset(i for i in byte_ids if i is not None)
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.pad_token_id = self._special_id("pad_token")
        self.unk_token_id = self._special_id("unk_token")
        eos_ids = [self.eos_token_id, *generation_eos_token_ids]
        self.eos_token_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the post-processor adds (BOS for Llama)."""
        return self.backend.encode(_text(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel in Rust."""
        encodings = self.backend.encode_batch(
            [_text(t) for t in texts], add_special_tokens=add_special_tokens
        )
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, a list, tensor or array (transformers' `decode`: special tokens kept by default)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping] | None = None,
        documents: Sequence[Mapping] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """The prompt for `messages`, rendered as transformers' `apply_chat_template` renders it.

        `chat_template` is a template's name (when the checkpoint has several) or Jinja source; `kwargs`
        become template variables (e.g. `enable_thinking=False`). Token ids are encoded without adding
        special tokens: the template writes them.
        """
        template = self._select_template(chat_template, tools)
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja, as transformers lays them out."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            key: value
            for key, value in self.config.items()
            if key not in ("chat_template", "added_tokens_decoder")
        }
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        added = sorted(self.backend.get_added_tokens_decoder().items())
        config["added_tokens_decoder"] = {str(i): _added_token_dict(token) for i, token in added}
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [
                {"name": name, "template": t} for name, t in self.chat_template.items()
            ]
        _write_atomic(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        if isinstance(self.chat_template, str):
            _write_atomic(folder / "chat_template.jinja", self.chat_template)
        _write_atomic(
            folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        return folder

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def _select_template(self, name_or_source: str | None, tools: Sequence[Mapping] | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_source is not None:
                return templates.get(name_or_source, name_or_source)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise TokenizerError(
                f"this tokenizer has several chat templates and none is 'default'; pass chat_template= one of "
                f"{sorted(templates)}"
            )
        if name_or_source is not None:
            return name_or_source
        if templates is None:
            raise TokenizerError(
                "this tokenizer has no chat template; pass chat_template= Jinja source, or add "
                "chat_template.jinja to the checkpoint folder"
            )
        return templates


def _text(text: object) -> str:
    if not isinstance(text, str):
        raise InputError(f"the tokenizer encodes strings, not {type(text).__name__}")
    return check_text(text, "the text to tokenize")


def load_tokenizer(path_or_id: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint folder or hub id: tokenizer.json with tokenizer_config.json's special
    tokens, the chat template, and generation_config.json's end-of-sequence ids."""
    folder = resolve_model_path(path_or_id)
    file = checkpoint_file(folder, "tokenizer.json")
    if not file.is_file():
        hint = ""
        if (folder / "tokenizer.model").is_file():
            hint = (
                " (it has a SentencePiece tokenizer.model: convert it once with transformers, "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
            )
        raise TokenizerError(f"{folder} has no tokenizer.json{hint}; pass a folder that holds one")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a bare Exception for every malformed file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(
            f"{file} is not a valid tokenizer file ({reason}); re-save it with transformers"
        ) from None
    config = _read_json(checkpoint_file(folder, "tokenizer_config.json"))
    # Older checkpoints name their special tokens in special_tokens_map.json.
    if "added_tokens_decoder" not in config:
        config.update(_read_json(checkpoint_file(folder, "special_tokens_map.json")))
    generation = _read_json(checkpoint_file(folder, "generation_config.json"))
    eos = generation.get("eos_token_id")
    generation_eos = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
    return Tokenizer(backend, config, _read_chat_template(folder, config), generation_eos)


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's named special tokens: the standard seven and model-specific `*_token` keys."""
    named = {}
    for key, value in config.items():
        is_token = isinstance(value, str) or (isinstance(value, Mapping) and "content" in value)
        if is_token and (key in _STANDARD_SPECIAL_TOKENS or key.endswith("_token")):
            named[key] = value
        elif key in _STANDARD_SPECIAL_TOKENS and value is not None:
            raise TokenizerError(
                f"tokenizer_config.json's {key} is {value!r}; make it a string or {{'content': ...}}"
            )
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        named.update(extra)
    return named


def _register_added_tokens(backend: tokenizers.Tokenizer, config: Mapping[str, Any], named: Mapping) -> None:
    """Add the config's added and special tokens the backend lacks (a token in the vocab keeps its id)."""
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, Mapping):
        raise TokenizerError(
            "tokenizer_config.json's added_tokens_decoder must map ids to token dicts; fix it"
        )
    tokens = [_added_token(spec, special=False) for _, spec in sorted(declared.items(), key=_id_order)]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra_values = [] if isinstance(extra, Mapping) else list(extra)
    tokens += [_added_token(value, special=True) for value in [*named.values(), *extra_values]]
    for token in tokens:
        if token.content not in present:
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
            present.add(token.content)


def _id_order(item: tuple[str, Any]) -> int:
    try:
        return int(item[0])
    except ValueError:
        raise TokenizerError(
            f"tokenizer_config.json's added_tokens_decoder has a non-integer id {item[0]!r}"
        ) from None


def _added_token(value: Any, special: bool) -> AddedToken:
    """An AddedToken from a config entry; `special` forces the flag (named tokens are always special)."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {flag: bool(value[flag]) for flag in _ADDED_TOKEN_FLAGS if flag in value}
        if special:
            flags["special"] = True
        return AddedToken(value["content"], **flags)
    raise TokenizerError(
        f"tokenizer_config.json has a token {value!r} that is not a string or {{'content': ...}}"
    )


def _added_token_dict(token: AddedToken) -> dict[str, Any]:
    return {"content": token.content, **{flag: getattr(token, flag) for flag in _ADDED_TOKEN_FLAGS}}


def _set_bos_eos_post_processor(
    backend: tokenizers.Tokenizer, config: Mapping, special: Mapping[str, str]
) -> None:
    """Honour `add_bos_token`/`add_eos_token` when tokenizer.json has no post-processor to say it."""
    bos = special.get("bos_token") if config.get("add_bos_token") else None
    eos = special.get("eos_token") if config.get("add_eos_token") else None
    if bos is None and eos is None:
        return
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    used = [token for token in (bos, eos) if token]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, backend.token_to_id(token)) for token in used]
    )


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja and chat_templates/*.jinja (transformers 5) win over the config's entry."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = checkpoint_file(folder, "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((folder / "chat_templates").glob("*.jinja")):
        checkpoint_file(folder, f"chat_templates/{file.name}")
        templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(
        "tokenizer_config.json's chat_template must be a string or a list of {name, template}; fix it"
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); fix or re-save it") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(value).__name__}; fix or re-save it")
    return value


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)
