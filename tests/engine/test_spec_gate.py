"""The speculation gate: warm-up, the choice by measured rate, probing, buckets; and the engine's use of it."""

from effllm.engine import LLM, SamplingParams
from effllm.engine.spec_decode.gate import SpeculationGate


def drive(gate, running, drafted_rate, plain_rate, steps):
    choices = []
    for _ in range(steps):
        draft = gate.should_draft(running)
        choices.append(draft)
        gate.record(running, draft, drafted_rate if draft else plain_rate, 1.0)
    return choices


def test_gate_warms_up_both_then_keeps_the_faster_and_probes_the_other():
    gate = SpeculationGate(probe_every=8, warmup=2)
    choices = drive(gate, 1, drafted_rate=50.0, plain_rate=100.0, steps=40)
    assert choices[:4] == [True, True, False, False]
    probes = [i for i in range(5, 41) if i % 8 == 0]  # decisions 5 .. 40 that take the other choice
    assert [i for i, c in enumerate(choices[4:], 5) if c] == probes  # only the probes draft
    gate = SpeculationGate(probe_every=8, warmup=2)
    choices = drive(gate, 1, drafted_rate=150.0, plain_rate=100.0, steps=40)
    assert [i for i, c in enumerate(choices[4:], 5) if not c] == probes


def test_buckets_decide_apart():
    gate = SpeculationGate(probe_every=1000, warmup=1)
    drive(gate, 1, drafted_rate=200.0, plain_rate=100.0, steps=5)  # pays alone
    drive(gate, 12, drafted_rate=100.0, plain_rate=300.0, steps=5)  # does not at 8-15 running
    assert gate.should_draft(1) and not gate.should_draft(12) and not gate.should_draft(9)


def test_engine_with_the_gate_gives_the_same_output(tiny_llama):
    prompts = [[5, 6, 7, 8] * 6, [9, 3] * 10]
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = [o.token_ids for o in LLM(tiny_llama).generate(prompts, params, use_tqdm=False)]
    llm = LLM(tiny_llama, speculative_method="ngram")
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == plain
    bucket = llm.engine.gate.buckets[2]  # two requests decoding together
    assert bucket.drafted_samples >= 4 and bucket.decisions > 0
