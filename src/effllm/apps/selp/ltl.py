"""LTL on finite traces (LTLf): formulas over named predicates, parsed into negation normal form.

Grammar (loosest first): `a -> b`, `a | b`, `a & b`, `a U b`, `a R b`, then the prefix operators `!`, `X`
(next, strong: a next step must exist), `WX` (weak next), `F` (eventually), `G` (always), then `true`,
`false`, predicate names (lower-case words) and parentheses. `U` and `R` bind to the right.

Formulas are kept in negation normal form, so that progression (`effllm.apps.selp.dfa`) needs no
negation of temporal operators: `!X a = WX !a`, `!F a = G !a`, `!G a = F !a`, `!(a U b) = !a R !b`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effllm.core.errors import InputError


@dataclass(frozen=True)
class Lit:
    """A predicate (`positive`) or its negation, at the current step."""

    name: str
    positive: bool = True


@dataclass(frozen=True)
class Const:
    value: bool


@dataclass(frozen=True)
class And:
    parts: frozenset


@dataclass(frozen=True)
class Or:
    parts: frozenset


@dataclass(frozen=True)
class Unary:
    op: str  # X (strong next), WX (weak next), F, G
    arg: object


@dataclass(frozen=True)
class Binary:
    op: str  # U, R
    left: object
    right: object


TRUE, FALSE = Const(True), Const(False)
_TOKEN = re.compile(r"\s*(->|WX|[()!&|XFGUR]|true\b|false\b|[a-z][a-z0-9_]*)")
_DUAL = {"X": "WX", "WX": "X", "F": "G", "G": "F", "U": "R", "R": "U"}


def parse_ltl(text: str, predicates: set[str] | None = None) -> object:
    """The formula in negation normal form; InputError if it does not parse or names an unknown predicate."""
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise InputError(f"cannot read the formula at {text[pos : pos + 10]!r}")
        tokens.append(match.group(1))
        pos = match.end()
    parser = _Parser(tokens, predicates)
    formula = parser.implication()
    if parser.i != len(tokens):
        raise InputError(f"unexpected {tokens[parser.i]!r} in the formula {text!r}")
    return formula


class _Parser:
    def __init__(self, tokens: list[str], predicates: set[str] | None):
        self.tokens, self.i, self.predicates = tokens, 0, predicates

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise InputError("the formula ends too early")
        self.i += 1
        return token

    def implication(self):
        left = self.disjunction()
        if self.peek() == "->":
            self.take()
            return disj(negate(left), self.implication())
        return left

    def disjunction(self):
        parts = [self.conjunction()]
        while self.peek() == "|":
            self.take()
            parts.append(self.conjunction())
        return disj(*parts)

    def conjunction(self):
        parts = [self.binary()]
        while self.peek() == "&":
            self.take()
            parts.append(self.binary())
        return conj(*parts)

    def binary(self):
        left = self.unary()
        if self.peek() in ("U", "R"):
            op = self.take()
            return Binary(op, left, self.binary())
        return left

    def unary(self):
        token = self.take()
        if token == "!":
            return negate(self.unary())
        if token in ("X", "WX", "F", "G"):
            return Unary(token, self.unary())
        if token == "(":
            inner = self.implication()
            if self.peek() != ")":
                raise InputError("a parenthesis is not closed in the formula")
            self.take()
            return inner
        if token in ("true", "false"):
            return Const(token == "true")
        if re.fullmatch(r"[a-z][a-z0-9_]*", token):
            if self.predicates is not None and token not in self.predicates:
                raise InputError(f"the formula names {token!r}, which is not a predicate")
            return Lit(token)
        raise InputError(f"unexpected {token!r} in the formula")


def conj(*parts) -> object:
    flat = set()
    for p in parts:
        if p == FALSE:
            return FALSE
        if p != TRUE:
            flat |= p.parts if isinstance(p, And) else {p}
    if not flat:
        return TRUE
    return next(iter(flat)) if len(flat) == 1 else And(frozenset(flat))


def disj(*parts) -> object:
    flat = set()
    for p in parts:
        if p == TRUE:
            return TRUE
        if p != FALSE:
            flat |= p.parts if isinstance(p, Or) else {p}
    if not flat:
        return FALSE
    return next(iter(flat)) if len(flat) == 1 else Or(frozenset(flat))


def negate(f) -> object:
    """The negation of a formula in negation normal form, in negation normal form."""
    if isinstance(f, Const):
        return Const(not f.value)
    if isinstance(f, Lit):
        return Lit(f.name, not f.positive)
    if isinstance(f, And):
        return disj(*(negate(p) for p in f.parts))
    if isinstance(f, Or):
        return conj(*(negate(p) for p in f.parts))
    if isinstance(f, Unary):
        return Unary(_DUAL[f.op], negate(f.arg))
    return Binary(_DUAL[f.op], negate(f.left), negate(f.right))


def predicates_of(f) -> set[str]:
    if isinstance(f, Lit):
        return {f.name}
    if isinstance(f, (And, Or)):
        return set().union(*(predicates_of(p) for p in f.parts))
    if isinstance(f, Unary):
        return predicates_of(f.arg)
    if isinstance(f, Binary):
        return predicates_of(f.left) | predicates_of(f.right)
    return set()
