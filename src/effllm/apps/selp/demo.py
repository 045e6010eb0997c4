"""SELP's demo domain: a robot moving between the rooms of a house.

For each instruction: sample `samples` formulas from the model (few-shot prompt, each sample constrained
to the formula syntax by an EBNF grammar), vote by automaton equivalence, then decode a plan under the
winner's automaton and, as the baseline, under the predicate trie alone. Each result says whether the
voted formula is equivalent to the reference translation and whether each plan satisfies the reference.

`training_text` writes instruction -> formula and instruction -> plan pairs from the same templates for a
small fine-tune (`python -m effllm.apps.selp --write-data FILE`, then `effllm train`; docs/decoding.md);
the demo's own instructions (TASKS) are held out of it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from effllm.apps.selp.dfa import compile_ltl, equivalent
from effllm.apps.selp.plan import PlanConstraint, decode_plan
from effllm.apps.selp.voting import majority_vote

ROOMS = ["kitchen", "bedroom", "bathroom", "office", "garden", "hall"]
EXAMPLES = [  # the few-shot prompt (not among the tasks)
    ("Go to the hall.", "F hall", ["hall"]),
    ("Visit the bedroom, then the kitchen.", "F (bedroom & F kitchen)", ["bedroom", "kitchen"]),
    ("Go to the office and never the garden.", "F office & G !garden", ["office"]),
]
TASKS = [
    ("Go to the kitchen, then the garden.", "F (kitchen & F garden)"),
    ("Visit the office and the bedroom, in any order.", "F office & F bedroom"),
    ("Go to the garden but never enter the office.", "F garden & G !office"),
    (
        "Do not enter the kitchen before the bathroom, and end in the kitchen.",
        "(!kitchen U bathroom) & F kitchen",
    ),
    ("Visit the hall, then the bedroom, then the bathroom.", "F (hall & F (bedroom & F bathroom))"),
    ("Go to the kitchen and never the garden.", "F kitchen & G !garden"),
]


# instruction, formula and plan templates over rooms a, b, c
TEMPLATES = [
    ("Go to the {a}, then the {b}.", "F ({a} & F {b})", "{a} {b}"),
    ("Visit the {a} and the {b}, in any order.", "F {a} & F {b}", "{a} {b}"),
    ("Go to the {a} but never enter the {b}.", "F {a} & G !{b}", "{a}"),
    ("Do not enter the {a} before the {b}, and end in the {a}.", "(!{a} U {b}) & F {a}", "{b} {a}"),
    ("Visit the {a}, then the {b}, then the {c}.", "F ({a} & F ({b} & F {c}))", "{a} {b} {c}"),
    ("Go to the {a} and never the {b}.", "F {a} & G !{b}", "{a}"),
]


def training_text(seed: int = 0) -> str:
    """Every template over every ordered choice of rooms, as formula and plan examples, shuffled; the
    instructions of TASKS are left out."""
    held_out = {instruction for instruction, _ in TASKS}
    examples = []
    for instruction, formula, plan in TEMPLATES:
        for a, b, c in itertools.permutations(ROOMS, 3):
            text = instruction.format(a=a, b=b, c=c)
            if text in held_out:
                continue
            steps = plan.format(a=a, b=b, c=c).split()
            examples.append(f"Instruction: {text}\nFormula: {formula.format(a=a, b=b, c=c)}\n\n")
            examples.append(f"Instruction: {text}\nPlan:\n" + "".join(x + "\n" for x in steps) + "\n")
    random.Random(seed).shuffle(examples)
    return "".join(examples)


def formula_grammar(predicates: list[str]) -> str:
    """The formula syntax as EBNF (xgrammar's dialect), one formula then a newline."""
    atoms = " | ".join(f'"{p}"' for p in predicates)
    return "\n".join(
        [
            'root ::= " " disj "\\n"',
            'disj ::= conj (" | " conj)*',
            'conj ::= unary (" & " unary)*',
            'unary ::= "!" unary | "F " unary | "G " unary | "X " unary | atom | "(" disj ")" | "(" disj " U " disj ")"',
            f"atom ::= {atoms}",
        ]
    )


def translation_prompt(instruction: str) -> str:
    shots = "".join(f"Instruction: {i}\nFormula: {f}\n\n" for i, f, _ in EXAMPLES)
    return f"{shots}Instruction: {instruction}\nFormula:"  # the formula's first token carries its space


def plan_prompt(instruction: str) -> str:
    shots = "".join(
        f"Instruction: {i}\nPlan:\n" + "".join(p + "\n" for p in plan) + "\n" for i, _, plan in EXAMPLES
    )
    return f"{shots}Instruction: {instruction}\nPlan:\n"


@dataclass
class TaskResult:
    instruction: str
    reference: str
    votes: list[int]  # class sizes, largest first
    invalid: int
    samples_correct: int  # sampled formulas equivalent to the reference
    formula: str | None
    formula_correct: bool
    plan: list[str]
    plan_ok: bool
    baseline_plan: list[str]
    baseline_ok: bool


def run_task(
    llm, instruction: str, reference: str, samples: int = 10, temperature: float = 0.6, seed: int = 0
):
    from effllm.engine import SamplingParams

    params = [
        SamplingParams(
            temperature=temperature,
            seed=seed + i,
            max_tokens=40,
            structured={"grammar": formula_grammar(ROOMS)},
        )
        for i in range(samples)
    ]
    outs = llm.generate([translation_prompt(instruction)] * samples, params, use_tqdm=False)
    formulas = [o.outputs[0].text.strip() for o in outs if o.outputs[0].finish_reason == "stop"]
    formulas += [""] * (samples - len(formulas))  # cut off: counted as invalid
    vote = majority_vote(formulas, ROOMS)
    gold = compile_ltl(reference, ROOMS)
    correct = sum(len(c) for c in vote.classes if equivalent(compile_ltl(c[0], ROOMS), gold))
    dfa = vote.dfa if vote.dfa is not None else compile_ltl("true", ROOMS)
    plan, _ = decode_plan(llm, plan_prompt(instruction), PlanConstraint(ROOMS, dfa), max_steps=12)
    baseline, _ = decode_plan(llm, plan_prompt(instruction), PlanConstraint(ROOMS), max_steps=12)
    return TaskResult(
        instruction,
        reference,
        [len(c) for c in vote.classes],
        len(vote.invalid),
        correct,
        vote.winner,
        vote.dfa is not None and equivalent(vote.dfa, gold),
        plan,
        gold.accepts(plan),
        baseline,
        gold.accepts(baseline),
    )
