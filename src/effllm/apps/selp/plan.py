"""SELP's constrained plan decoding as an engine constraint: each plan step is one predicate on its own
line, chosen through a token trie of the predicates, and only predicates after which the formula's
automaton can still reach acceptance are allowed; the plan may end (an end token) only in an accepting
state. As in SELP's `constrained_decode_plan_trie`, the predicate just executed is banned at the next step
(`no_repeat`), unless nothing else keeps the plan satisfiable.

    constraint = PlanConstraint(["kitchen", "garden"], compile_ltl("F kitchen & F garden", ...))
    plan, text = decode_plan(llm, prompt, constraint)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effllm.apps.selp.dfa import DFA
from effllm.core.errors import InputError
from effllm.engine.structured.grammar import Constraint, Grammar, set_tokens
from effllm.engine.structured.trie import TokenTrie

SEPARATOR = "\n"


@dataclass
class CompiledPlan:
    trie: TokenTrie
    below: list[frozenset[int]]  # per trie node: the predicates whose path passes through it
    stop_token_ids: frozenset[int]
    end_line: int  # the separator's token: at the start of a line, an empty line ends the plan


class PlanConstraint(Constraint):
    def __init__(
        self,
        predicates: list[str],
        dfa: DFA | None = None,
        no_repeat: bool = True,
        stop_at_acceptance: bool = True,
    ):
        if not predicates or len(set(predicates)) != len(predicates):
            raise InputError("a plan needs distinct predicates")
        if dfa is not None and tuple(dfa.alphabet) != tuple(predicates):
            raise InputError("the automaton's alphabet must be the plan's predicates, in the same order")
        self.predicates, self.dfa, self.no_repeat = list(predicates), dfa, no_repeat
        self.stop_at_acceptance = stop_at_acceptance

    def key(self) -> str:
        return "\x00".join(self.predicates)  # the trie depends on the predicates only

    def compile(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> CompiledPlan:
        paths = [tokenizer.encode(p + SEPARATOR, add_special_tokens=False) for p in self.predicates]
        trie = TokenTrie(paths)
        below: list[set[int]] = [set() for _ in trie.children]
        for index, ids in enumerate(paths):
            node = 0
            below[0].add(index)
            for token in ids:
                node = trie.children[node][token]
                below[node].add(index)
        (end_line,) = tokenizer.encode(SEPARATOR, add_special_tokens=False)[:1]
        return CompiledPlan(trie, [frozenset(b) for b in below], frozenset(stop_token_ids), end_line)

    def matcher(self, compiled: CompiledPlan) -> PlanGrammar:
        return PlanGrammar(compiled, self.dfa, self.no_repeat, self.stop_at_acceptance)


class PlanGrammar(Grammar):
    def __init__(self, compiled: CompiledPlan, dfa: DFA | None, no_repeat: bool, stop_at_acceptance: bool):
        self.c, self.dfa, self.no_repeat = compiled, dfa, no_repeat
        self.stop_at_acceptance = stop_at_acceptance and dfa is not None
        self.stack: list[tuple[int, int, int | None]] = [(0, 0, None)]  # (automaton state, node, last)
        self.done = False
        self.done_at = -1  # stack depth when the end token was accepted

    @property
    def ended(self) -> bool:
        """After the plan's empty line: only an end token may follow."""
        return self.stack[-1][1] == -1

    # ------------------------------------------------------------------ what is allowed
    def allowed_predicates(self) -> frozenset[int]:
        state, _, last = self.stack[-1]
        every = range(len(self.c.below[0]))
        keep = [i for i in every if self._keeps_live(state, i)]
        if self.no_repeat and last is not None and any(i != last for i in keep):
            keep = [i for i in keep if i != last]
        return frozenset(keep)

    def _keeps_live(self, state: int, index: int) -> bool:
        if self.dfa is None:
            return True
        return self.dfa.delta[state][self.dfa.alphabet[index]] in self.dfa.live

    def may_end(self) -> bool:
        state, node, _ = self.stack[-1]
        return node == 0 and (self.dfa is None or state in self.dfa.accepting)

    def _allowed_tokens(self) -> set[int]:
        if self.done or self.ended:
            return set(self.c.stop_token_ids)
        if self.stop_at_acceptance and self.may_end():
            return set(self.c.stop_token_ids)
        _, node, _ = self.stack[-1]
        allowed = self.allowed_predicates()
        tokens = {t for t, child in self.c.trie.children[node].items() if self.c.below[child] & allowed}
        if self.may_end() or not tokens:  # no way on: let the plan end rather than emit nothing
            tokens |= self.c.stop_token_ids
            if node == 0:
                tokens.add(self.c.end_line)
        return tokens

    # ------------------------------------------------------------------ the Grammar interface
    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        set_tokens(bitmask, row, self._allowed_tokens())

    def accept(self, token: int) -> bool:
        if token not in self._allowed_tokens():
            return False
        if token in self.c.stop_token_ids:
            self.done, self.done_at = True, len(self.stack)
            self.stack.append(self.stack[-1])
            return True
        state, node, last = self.stack[-1]
        if node == 0 and token == self.c.end_line and token not in self.c.trie.children[0]:
            self.stack.append((state, -1, last))  # the empty line: the plan is over
            return True
        child = self.c.trie.children[node][token]
        end = self.c.trie.ends[child]
        if end is None:
            self.stack.append((state, child, last))
        else:
            nxt = state if self.dfa is None else self.dfa.delta[state][self.dfa.alphabet[end]]
            self.stack.append((nxt, 0, end))
        return True

    def rollback(self, num_tokens: int) -> None:
        for _ in range(num_tokens):
            if self.done and len(self.stack) == self.done_at + 1:
                self.done = False
            self.stack.pop()

    @property
    def is_terminated(self) -> bool:
        return self.done

    @property
    def automaton_state(self) -> int:
        return self.stack[-1][0]


def parse_plan(text: str, predicates: list[str]) -> list[str]:
    """The plan's predicates, one per line (the constraint makes every line one of them)."""
    return [line for line in text.split(SEPARATOR) if line in predicates]


def decode_plan(llm: Any, prompt: str, constraint: PlanConstraint, max_steps: int = 40, **sampling: Any):
    """(plan, raw text) decoded from `prompt` under `constraint` (greedy unless `sampling` says otherwise)."""
    from effllm.engine import SamplingParams

    params = SamplingParams(
        **{"temperature": 0.0, "max_tokens": 8 * max_steps, **sampling}, structured={"constraint": constraint}
    )
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    text = out.outputs[0].text
    return parse_plan(text, constraint.predicates), text
