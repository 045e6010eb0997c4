"""The xgrammar backend (`pip install effllm[structured]`): JSON Schema, JSON object, regex, EBNF and Lark
compiled against the model's vocabulary, matched token by token.

xgrammar needs each token's stored string and how the vocabulary encodes bytes; `tokenizer_info` reads
both from the `tokenizers` backend (what `xgrammar.TokenizerInfo.from_huggingface` does with a
transformers tokenizer, which EffLLM does not load at run time). The mask is as wide as the model's
vocabulary: ids past the tokenizer's (padding rows of the embedding) are empty tokens, never allowed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from effllm.core.errors import ConfigError, InputError
from effllm.engine.structured.grammar import Grammar
from effllm.engine.structured.spec import StructuredOutputs

_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")
# JSON Schema keywords xgrammar would ignore (so the output could break them): refused up front, as vLLM does.
UNSUPPORTED_KEYWORDS = (
    "multipleOf",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "minProperties",
    "maxProperties",
    "propertyNames",
    "patternProperties",
    "dependentSchemas",
    "dependentRequired",
    "if",
    "not",
)
SUPPORTED_FORMATS = (
    "date",
    "time",
    "date-time",
    "duration",
    "email",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
)


def import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ConfigError(
            "JSON schema, regex and grammar constraints need xgrammar: pip install 'effllm[structured]'"
        ) from None
    return xgrammar


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
    """`xgrammar.TokenizerInfo` of an EffLLM `Tokenizer`, `vocab_size` wide (the model's vocabulary)."""
    xgr = import_xgrammar()
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, index in vocab.items():
        if index < vocab_size:
            encoded[index] = token
    spec = json.loads(tokenizer.backend.to_str())
    vocab_type, prefix_space = _vocab_type(spec, xgr.VocabType)
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=[t for t in stop_token_ids if t < vocab_size],
        add_prefix_space=prefix_space,
    )


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    parts = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers")
    return [c for part in parts for c in _components(part)] if parts else [node]


def _vocab_type(spec: dict[str, Any], kinds) -> tuple[Any, bool]:
    """(VocabType, add_prefix_space) from tokenizer.json: GPT-2 byte-level tokens, SentencePiece tokens
    with <0xXX> byte fallback (and the "▁" prefix space), or raw strings."""
    decoders = {c.get("type") for c in _components(spec.get("decoder"))}
    if "ByteLevel" in decoders:
        return kinds.BYTE_LEVEL, False
    if "ByteFallback" in decoders:
        prefix = any(
            c.get("type") == "Prepend" and c.get("prepend") == "▁"
            for c in _components(spec.get("normalizer"))
        ) or any(
            c.get("type") == "Metaspace" and c.get("prepend_scheme", "always") != "never"
            for c in _components(spec.get("pre_tokenizer"))
        )
        return kinds.BYTE_FALLBACK, prefix
    return kinds.RAW, False


def check_json_schema(schema: Any, path: str = "schema") -> None:
    """InputError naming the first keyword or format the backend cannot enforce."""
    if not isinstance(schema, dict):
        return
    for key in UNSUPPORTED_KEYWORDS:
        if key in schema:
            raise InputError(f"JSON schema keyword {key!r} (at {path}) is not supported; remove it")
    fmt = schema.get("format")
    if fmt is not None and fmt not in SUPPORTED_FORMATS:
        raise InputError(f"JSON schema format {fmt!r} (at {path}) is not supported")
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                check_json_schema(sub, f"{path}.{key}.{name}")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            for n, sub in enumerate(value):
                check_json_schema(sub, f"{path}.{key}[{n}]")
        elif key in ("items", "additionalProperties", "then", "else"):
            check_json_schema(value, f"{path}.{key}")


class XGrammarCompiler:
    """Compiles specs for one model's vocabulary (thread-safe: xgrammar compiles on its own threads)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        xgr = import_xgrammar()
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)

    def compile(self, spec: StructuredOutputs) -> Any:
        kind = spec.kind
        try:
            if kind == "json_schema":
                check_json_schema(spec.json_schema)
                return self.compiler.compile_json_schema(
                    json.dumps(spec.json_schema), any_whitespace=spec.any_whitespace, strict_mode=True
                )
            if kind == "json_object":
                return self.compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=spec.any_whitespace
                )
            if kind == "regex":
                return self.compiler.compile_regex(spec.regex)
            if kind == "grammar":
                if "::=" in spec.grammar:
                    return self.compiler.compile_grammar(spec.grammar)
                return self.compiler.compile_lark(spec.grammar)
        except InputError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with a parser message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = _LOG_PREFIX.sub("", first)  # xgrammar's "[hh:mm:ss] file.cc:line: " prefix
            raise InputError(f"the {kind.replace('_', ' ')} could not be compiled: {first}") from None
        raise InputError(f"the xgrammar backend does not compile {kind} constraints")

    def matcher(self, compiled: Any) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)


class XGrammarMatcher(Grammar):
    def __init__(self, compiled: Any):
        xgr = import_xgrammar()
        self._matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return self._matcher.accept_token(token)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()
