"""LTLf formulas compiled to DFAs over plans, by formula progression (Bacchus & Kabanza).

A plan is a sequence of steps, each executing exactly one predicate (SELP's setting: one action per
step). The state after a prefix is the formula the rest of the plan must satisfy, kept in disjunctive
normal form over "elementary" formulas (literals and temporal operators, all subformulas of the original),
so there are finitely many states. Progressing over step `a` rewrites each elementary formula:

    p -> (p == a)       !p -> (p != a)       X f -> f & MORE      WX f -> f | END
    F f -> prog(f) | F f                     G f -> prog(f) & G f
    f U g -> prog(g) | (prog(f) & f U g)     f R g -> prog(g) & (prog(f) | f R g)

where END says "the plan ends here" and MORE "the plan goes on" (END progresses to false, MORE to true).
A state accepts the end of the plan when one of its conjunctions holds on the empty remainder: G, R, WX
and END do; literals, X, F, U and MORE do not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from effllm.apps.selp.ltl import And, Binary, Const, Lit, Or, Unary, parse_ltl
from effllm.core.errors import InputError


@dataclass(frozen=True)
class Marker:
    """END or MORE: whether the plan stops after the steps progressed so far."""

    ends: bool


END, MORE = Marker(True), Marker(False)

# A state: a set of conjunctions of elementary formulas. frozenset() is false, {frozenset()} is true.
State = frozenset
FALSE_STATE: State = frozenset()
TRUE_STATE: State = frozenset({frozenset()})
MAX_STATES = 10_000


def _simplify(clauses) -> State:
    """Drop conjunctions that contain another (absorption) and contradictions."""
    kept = set()
    for c in clauses:
        if END in c and (MORE in c or any(isinstance(e, Lit) for e in c)):  # a literal needs a step
            continue
        lits = {e for e in c if isinstance(e, Lit)}
        if any(Lit(e.name, not e.positive) in lits for e in lits):
            continue
        if len({e.name for e in lits if e.positive}) > 1:  # two actions at one step
            continue
        kept.add(frozenset(c))
    return frozenset(c for c in kept if not any(o < c for o in kept))


def _and(a: State, b: State) -> State:
    return _simplify(x | y for x in a for y in b)


def _or(a: State, b: State) -> State:
    return _simplify(a | b)


def to_state(f) -> State:
    """A formula as a state (its DNF over elementary formulas)."""
    if isinstance(f, Const):
        return TRUE_STATE if f.value else FALSE_STATE
    if isinstance(f, And):
        out = TRUE_STATE
        for p in f.parts:
            out = _and(out, to_state(p))
        return out
    if isinstance(f, Or):
        out = FALSE_STATE
        for p in f.parts:
            out = _or(out, to_state(p))
        return out
    return frozenset({frozenset({f})})


def _progress_elementary(e, action: str) -> State:
    if isinstance(e, Marker):
        return FALSE_STATE if e.ends else TRUE_STATE
    if isinstance(e, Lit):
        return TRUE_STATE if (e.name == action) == e.positive else FALSE_STATE
    if isinstance(e, Unary):
        if e.op == "X":
            return _and(to_state(e.arg), frozenset({frozenset({MORE})}))
        if e.op == "WX":
            return _or(to_state(e.arg), frozenset({frozenset({END})}))
        inner = progress(to_state(e.arg), action)
        keep = frozenset({frozenset({e})})
        return _or(inner, keep) if e.op == "F" else _and(inner, keep)
    assert isinstance(e, Binary)
    left, right = progress(to_state(e.left), action), progress(to_state(e.right), action)
    keep = frozenset({frozenset({e})})
    if e.op == "U":
        return _or(right, _and(left, keep))
    return _and(right, _or(left, keep))


def progress(state: State, action: str) -> State:
    """The state after one step that executes `action`."""
    out = FALSE_STATE
    for clause in state:
        part = TRUE_STATE
        for e in clause:
            part = _and(part, _progress_elementary(e, action))
            if not part:
                break
        out = _or(out, part)
    return out


def _accepts_empty(e) -> bool:
    if isinstance(e, Marker):
        return e.ends
    if isinstance(e, Unary):
        return e.op in ("G", "WX")
    if isinstance(e, Binary):
        return e.op == "R"
    return False


def accepting(state: State) -> bool:
    return any(all(_accepts_empty(e) for e in clause) for clause in state)


@dataclass
class DFA:
    """States 0..n-1 (0 the start), `delta[s][action]`, `accepting` states, and `live`: the states from
    which an accepting state can still be reached."""

    alphabet: tuple[str, ...]
    delta: list[dict[str, int]]
    accepting: frozenset[int]
    live: frozenset[int]

    def run(self, plan: list[str]) -> int:
        state = 0
        for action in plan:
            state = self.delta[state][action]
        return state

    def accepts(self, plan: list[str]) -> bool:
        return self.run(plan) in self.accepting


def compile_ltl(formula: str | object, alphabet: list[str] | tuple[str, ...]) -> DFA:
    """The DFA of a formula (text or parsed) over plans of `alphabet`'s actions."""
    alphabet = tuple(alphabet)
    if isinstance(formula, str):
        formula = parse_ltl(formula, set(alphabet))
    start = to_state(formula)
    index, states, delta = {start: 0}, [start], []
    queue = deque([start])
    while queue:
        state = queue.popleft()
        row = {}
        for action in alphabet:
            nxt = progress(state, action)
            if nxt not in index:
                if len(states) >= MAX_STATES:
                    raise InputError(
                        f"the formula needs more than {MAX_STATES} automaton states; simplify it"
                    )
                index[nxt] = len(states)
                states.append(nxt)
                queue.append(nxt)
            row[action] = index[nxt]
        delta.append(row)
    accept = frozenset(i for i, s in enumerate(states) if accepting(s))
    return DFA(alphabet, delta, accept, _live(delta, accept))


def _live(delta: list[dict[str, int]], accept: frozenset[int]) -> frozenset[int]:
    back: list[set[int]] = [set() for _ in delta]
    for s, row in enumerate(delta):
        for t in row.values():
            back[t].add(s)
    live, queue = set(accept), deque(accept)
    while queue:
        for s in back[queue.popleft()]:
            if s not in live:
                live.add(s)
                queue.append(s)
    return frozenset(live)


def equivalent(a: DFA, b: DFA) -> bool:
    """Whether two DFAs over the same alphabet accept the same plans (search of their product)."""
    if a.alphabet != b.alphabet:
        raise InputError("automata over different predicates cannot be compared")
    seen, queue = {(0, 0)}, deque([(0, 0)])
    while queue:
        s, t = queue.popleft()
        if (s in a.accepting) != (t in b.accepting):
            return False
        for action in a.alphabet:
            pair = (a.delta[s][action], b.delta[t][action])
            if pair not in seen:
                seen.add(pair)
                queue.append(pair)
    return True
