"""`StructuredOutputManager`: compiles each distinct constraint once and masks a step's logits.

The engine gives every constrained request its own matcher (`grammar_for`) when the request arrives; the
compiled grammar behind it is cached by the spec's key, so the server compiles a request's spec on a
worker thread before submitting it (`compile`) and the engine loop only finds it in the cache. Each step
`mask_logits` fills one bitmask row per sampled position (one per draft too) and sets every logit the
grammar forbids to -inf.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from effllm.core.errors import ConfigError, InputError
from effllm.engine.request import Request
from effllm.engine.structured.grammar import Grammar, apply_bitmask, new_bitmask
from effllm.engine.structured.spec import StructuredOutputs
from effllm.engine.structured.trie import ChoiceGrammar, TokenTrie

BACKENDS = ("auto", "xgrammar", "builtin")
CACHE_SIZE = 256


def resolve_backend(name: str) -> str:
    """'xgrammar' or 'builtin' ('auto': xgrammar when it is installed)."""
    if name not in BACKENDS:
        raise ConfigError(f"structured outputs backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "builtin":
        return name
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        if name == "xgrammar":
            raise ConfigError(
                "--structured-outputs-backend xgrammar needs xgrammar: pip install 'effllm[structured]'"
            ) from None
        return "builtin"
    return "xgrammar"


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], backend: str = "auto"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.backend = resolve_backend(backend)
        self._xgrammar = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ compiling
    def compile(self, spec: StructuredOutputs) -> Any:
        """The compiled form of `spec` (cached); InputError when it cannot be compiled."""
        if self.tokenizer is None:
            raise InputError("structured outputs need the model's tokenizer; load the model with one")
        if not self.stop_token_ids:
            raise InputError("structured outputs need an end-of-sequence token; this model has none")
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputs) -> Any:
        if spec.kind == "constraint":
            return spec.constraint.compile(self.tokenizer, self.vocab_size, self.stop_token_ids)
        if spec.kind == "choice":
            encode = self.tokenizer.encode
            return TokenTrie(encode(c, add_special_tokens=False) for c in spec.choice)
        if self.backend == "builtin":
            raise InputError(
                f"{spec.kind} constraints need the xgrammar backend (pip install 'effllm[structured]'); "
                "the built-in backend does choice only"
            )
        return self._xgrammar_compiler().compile(spec)

    def _xgrammar_compiler(self):
        from effllm.engine.structured.xgrammar_backend import XGrammarCompiler

        with self._lock:
            if self._xgrammar is None:
                self._xgrammar = XGrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self._xgrammar

    def grammar_for(self, spec: StructuredOutputs) -> Grammar:
        """A fresh matcher for one request."""
        compiled = self.compile(spec)
        if spec.kind == "constraint":
            return spec.constraint.matcher(compiled)
        if isinstance(compiled, TokenTrie):
            return ChoiceGrammar(compiled, self.stop_token_ids)
        return self._xgrammar_compiler().matcher(compiled)

    # ------------------------------------------------------------------ each step
    def mask_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits [rows, vocab] of the step's sampled positions (each request: one row per draft, then
        one) with what each constrained request's grammar forbids set to -inf."""
        if not any(r.grammar is not None for r in requests):
            return logits
        bitmask = new_bitmask(logits.shape[0], logits.shape[-1])
        row = 0
        for request in requests:
            if request.grammar is not None:
                fill_rows(request.grammar, request.draft_token_ids, bitmask, row)
            row += len(request.draft_token_ids) + 1
        return apply_bitmask(logits, bitmask)


def fill_rows(grammar: Grammar, drafts: list[int], bitmask: torch.Tensor, row: int) -> None:
    """Rows row .. row + len(drafts): the allowed tokens after each prefix of the drafts. Rows after a
    draft the grammar refuses stay all-allowed: that draft is rejected, so they are never used."""
    accepted = 0
    for i in range(len(drafts) + 1):
        grammar.fill(bitmask, row + i)
        if i == len(drafts) or not grammar.accept(drafts[i]):
            break
        accepted += 1
    grammar.rollback(accepted)
