"""SELP: the LTLf parser and its automata against a direct evaluation of the finite-trace semantics,
equivalence voting, and plan decoding in the engine (every plan satisfies the formula; with `true` the
decode is the trie-only one)."""

import itertools

import pytest
import torch

from effllm.apps.selp import PlanConstraint, compile_ltl, decode_plan, equivalent, majority_vote, parse_ltl
from effllm.apps.selp.ltl import And, Binary, Const, Lit, Or, Unary
from effllm.core.errors import InputError
from effllm.models import load_model, save_model

A = ["a", "b", "c"]
FORMULAS = [
    "true",
    "false",
    "a",
    "!a",
    "X b",
    "WX b",
    "!X b",
    "F a & F b",
    "G !c",
    "F (a & X F b)",
    "!a U b",
    "a R b",
    "G (a -> X b)",
    "F a -> G !b",
    "!(F c | G a)",
    "(a | b) U (c & WX false)",
    "G F a",
    "F G b",
    "X true",
    "WX false",
    "G (a -> WX b)",
    "F (c & X X true)",
]


def holds(f, trace, i=0) -> bool:
    """LTLf semantics on a finite trace (one action per step), straight from the definitions."""
    n = len(trace)
    if isinstance(f, Const):
        return f.value
    if isinstance(f, Lit):
        return i < n and (trace[i] == f.name) == f.positive
    if isinstance(f, And):
        return all(holds(p, trace, i) for p in f.parts)
    if isinstance(f, Or):
        return any(holds(p, trace, i) for p in f.parts)
    if isinstance(f, Unary):
        if f.op == "X":
            return i + 1 < n and holds(f.arg, trace, i + 1)
        if f.op == "WX":
            return i + 1 >= n or holds(f.arg, trace, i + 1)
        if f.op == "F":
            return any(holds(f.arg, trace, j) for j in range(i, n))
        return all(holds(f.arg, trace, j) for j in range(i, n))
    if f.op == "U":
        return any(
            holds(f.right, trace, k) and all(holds(f.left, trace, j) for j in range(i, k))
            for k in range(i, n)
        )
    return all(
        holds(f.right, trace, k) or any(holds(f.left, trace, j) for j in range(i, k)) for k in range(i, n)
    )


@pytest.mark.parametrize("text", FORMULAS)
def test_the_automaton_accepts_exactly_the_plans_that_satisfy_the_formula(text):
    formula, dfa = parse_ltl(text), compile_ltl(text, A)
    for n in range(1, 6):
        for plan in itertools.product(A, repeat=n):
            assert dfa.accepts(list(plan)) == holds(formula, list(plan)), (text, plan)
    live = {s for s in range(len(dfa.delta))}
    assert dfa.live <= live and dfa.accepting <= dfa.live


def test_parser_precedence_negation_normal_form_and_errors():
    assert parse_ltl("!F a") == Unary("G", Lit("a", False))
    assert parse_ltl("a & b | c") == Or(frozenset({And(frozenset({Lit("a"), Lit("b")})), Lit("c")}))
    assert parse_ltl("!(a U b)") == Binary("R", Lit("a", False), Lit("b", False))
    assert parse_ltl("a -> b") == parse_ltl("!a | b")
    for bad, message in [
        ("F", "ends too early"),
        ("(a", "not closed"),
        ("a b", "unexpected"),
        ("A", "cannot read"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_ltl(bad)
    with pytest.raises(InputError, match="not a predicate"):
        parse_ltl("F d", set(A))


def test_equivalence_of_automata():
    eq = lambda x, y: equivalent(compile_ltl(x, A), compile_ltl(y, A))  # noqa: E731
    assert eq("F a & F b", "F b & F a")
    assert eq("!F a", "G !a") and eq("G (a -> X b)", "!F (a & !X b)")
    assert not eq("F a", "G a") and not eq("X a", "WX a") and not eq("F (a & F b)", "F (b & F a)")


def test_voting_keeps_the_majority_class_and_drops_what_does_not_parse():
    samples = [
        "F b & F a",
        "F a & F b",
        "F (a & F b)",
        "F a & F b",
        "F b & (F a)",
        "G !c",
        "F (",
        "F a & F b & true",
    ]
    samples += ["F (a & F b)", "F (a & X F b)"]
    vote = majority_vote(samples, A)
    assert vote.winner == "F b & F a" and vote.classes[0] == [
        "F b & F a",
        "F a & F b",
        "F a & F b",
        "F b & (F a)",
        "F a & F b & true",
    ]
    assert vote.invalid == ["F ("] and sorted(map(len, vote.classes)) == [1, 3, 5]
    assert majority_vote(["(", "a b"], A).winner is None


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from effllm.engine import LLM
    from tests.engine.structured_fixtures import tiny_model_folder

    folder, tokenizer = tiny_model_folder(tmp_path_factory.mktemp("selp") / "tiny", seed=1)
    model = load_model(folder, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0  # logit 0: plans go on until the automaton ends them
    save_model(model, folder)
    return LLM(str(folder), dtype="float32")


ROOMS = ["kitchen", "garden", "office", "hall"]


@pytest.mark.parametrize(
    "formula",
    ["F kitchen & F garden", "F (hall & F (office & F kitchen)) & G !garden", "!office U garden & F office"],
)
def test_every_decoded_plan_satisfies_its_formula(llm, formula):
    dfa = compile_ltl(formula, ROOMS)
    for seed in range(6):
        plan, text = decode_plan(llm, "Plan:\n", PlanConstraint(ROOMS, dfa), temperature=1.0, seed=seed)
        assert dfa.accepts(plan) and text == "".join(p + "\n" for p in plan), (formula, text)
        assert all(x != y for x, y in zip(plan, plan[1:], strict=False))  # no predicate twice in a row


def test_with_formula_true_the_decode_is_the_trie_only_decode(llm):
    true = compile_ltl("true", ROOMS)
    plans = []
    for seed in range(10):
        kwargs = dict(temperature=1.0, seed=seed, max_steps=8)
        constrained = decode_plan(
            llm, "Plan:\n", PlanConstraint(ROOMS, true, stop_at_acceptance=False), **kwargs
        )
        trie_only = decode_plan(llm, "Plan:\n", PlanConstraint(ROOMS), **kwargs)
        assert constrained == trie_only
        plans.append(trie_only[0])
    assert sum(len(p) > 1 for p in plans) >= 2  # not only plans the end token cut short


def test_plan_grammar_rolls_back_drafts():
    from effllm.engine.structured.grammar import allowed_tokens, new_bitmask
    from effllm.models import load_tokenizer
    from effllm.models.default import default_model_path

    tokenizer = load_tokenizer(default_model_path())
    dfa = compile_ltl("F garden", ROOMS)
    constraint = PlanConstraint(ROOMS, dfa)
    compiled = constraint.compile(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])
    grammar = constraint.matcher(compiled)
    ids = tokenizer.encode("hall\ngarden\n", add_special_tokens=False)
    assert (
        tokenizer.encode("hall\n", add_special_tokens=False)
        + tokenizer.encode("garden\n", add_special_tokens=False)
        == ids
    )
    before = new_bitmask(1, tokenizer.vocab_size)
    grammar.fill(before, 0)
    for t in ids:
        assert grammar.accept(t)
    end = new_bitmask(1, tokenizer.vocab_size)
    grammar.fill(end, 0)  # accepting: the plan must end now
    assert allowed_tokens(end, tokenizer.vocab_size)[0].nonzero().flatten().tolist() == [
        tokenizer.eos_token_id
    ]
    assert grammar.accept(tokenizer.eos_token_id) and grammar.is_terminated
    grammar.rollback(len(ids) + 1)
    again = new_bitmask(1, tokenizer.vocab_size)
    grammar.fill(again, 0)
    assert not grammar.is_terminated and (again == before).all()
