"""SELP's equivalence voting: of N formulas sampled for one instruction, keep the largest class of
equivalent ones (grouped greedily against each class's first member, as SELP's `group_equivalent_formulas`
does); formulas that do not parse are dropped."""

from __future__ import annotations

from dataclasses import dataclass

from effllm.apps.selp.dfa import DFA, compile_ltl, equivalent
from effllm.core.errors import InputError


@dataclass
class Vote:
    winner: str | None  # the majority class's first formula (None when nothing parsed)
    dfa: DFA | None
    classes: list[list[str]]  # largest first
    invalid: list[str]


def majority_vote(formulas: list[str], alphabet: list[str]) -> Vote:
    classes: list[tuple[DFA, list[str]]] = []
    invalid = []
    for text in formulas:
        try:
            dfa = compile_ltl(text, alphabet)
        except InputError:
            invalid.append(text)
            continue
        for rep, members in classes:
            if equivalent(rep, dfa):
                members.append(text)
                break
        else:
            classes.append((dfa, [text]))
    classes.sort(key=lambda c: -len(c[1]))  # stable: ties keep the first class seen
    if not classes:
        return Vote(None, None, [], invalid)
    return Vote(classes[0][1][0], classes[0][0], [members for _, members in classes], invalid)
