"""SELP (ICRA 2025): plans decoded under a temporal-logic constraint, with equivalence voting over the
formulas a model translates an instruction into. `python -m effllm.apps.selp` runs the demo."""

from effllm.apps.selp.dfa import DFA, compile_ltl, equivalent
from effllm.apps.selp.ltl import parse_ltl
from effllm.apps.selp.plan import PlanConstraint, decode_plan
from effllm.apps.selp.voting import majority_vote

__all__ = ["DFA", "PlanConstraint", "compile_ltl", "decode_plan", "equivalent", "majority_vote", "parse_ltl"]
