"""One bad request never breaks the engine: parameters are checked up front, a failing step aborts only its
requests (blocks freed, error to each caller), and the next request gets the tokens a fresh engine gives."""

import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.core.errors import ConfigError, InputError
from effllm.engine import LLM, SamplingParams
from effllm.engine.llm_engine import StepError

POISON = 127  # a prompt starting with this token makes the (patched) model runner raise


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("n", "3"),
        ("top_k", 2.5),
        ("stop", 5),
        ("stop", ["a", 3]),
        ("seed", 2**70),
        ("seed", "1"),
        ("logprobs", "x"),
        ("ignore_eos", "yes"),
        ("temperature", math.nan),
        ("top_p", math.inf),
        ("max_tokens", 1.5),
        ("stop_token_ids", [1.0]),
        ("min_tokens", True),
    ],
)
def test_sampling_params_of_the_wrong_type_are_refused_naming_the_field(field, value):
    with pytest.raises(InputError, match=field):
        SamplingParams(**{field: value})


def test_requests_the_model_cannot_serve_are_refused_and_the_engine_goes_on(tiny_llama):
    llm = LLM(tiny_llama)
    greedy = SamplingParams(temperature=0, max_tokens=5)
    expected = llm.generate([[1, 2, 3]], greedy, use_tqdm=False)[0].token_ids
    for prompt, params in [
        ([1, 2], SamplingParams(logprobs=129)),
        ([1.0, 2.0], greedy),
        ([True], greedy),
        ({"prompt_token_ids": 7}, greedy),
        ([1, 2], {"temperature": 0}),
    ]:
        with pytest.raises(InputError):
            llm.generate([prompt], params, use_tqdm=False)
    assert llm.generate([[1, 2, 3]], greedy, use_tqdm=False)[0].token_ids == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_an_unknown_engine_option_lists_the_valid_ones(tiny_llama):
    with pytest.raises(
        ConfigError, match="unknown engine option 'unknown_option'; the options are block_size"
    ):
        LLM(tiny_llama, unknown_option=1)


PROBE = [[3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def fresh_outputs(tiny_llama):
    return (
        LLM(tiny_llama)
        .generate(PROBE, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
        .token_ids
    )


def poison_runner(llm: LLM) -> None:
    execute = llm.engine.runner.execute

    def failing(out):
        if any(r.prompt_token_ids[0] == POISON for r in out.requests):
            raise RuntimeError("injected failure")
        return execute(out)

    llm.engine.runner.execute = failing


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=4),
        min_size=1,
        max_size=4,
    )
)
def test_after_any_mix_of_failing_requests_a_valid_one_matches_a_fresh_engine(
    tiny_llama, fresh_outputs, batches
):
    llm = LLM(tiny_llama, max_num_batched_tokens=64, block_size=4)
    poison_runner(llm)
    for batch in batches:
        prompts = [[POISON if bad else 5] + list(range(1, n)) for bad, n, _ in batch]
        params = [SamplingParams(temperature=0, max_tokens=m) for _, _, m in batch]
        if any(bad for bad, _, _ in batch):
            with pytest.raises(StepError, match="injected failure"):
                llm.generate(prompts, params, use_tqdm=False)
        else:
            llm.generate(prompts, params, use_tqdm=False)
        blocks = llm.engine.block_manager
        assert not any(blocks.ref_counts) and not llm.engine.has_unfinished_requests()
    assert (
        llm.generate(PROBE, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].token_ids
        == fresh_outputs
    )


def test_generate_from_two_threads_takes_turns(tiny_llama):
    llm = LLM(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 120, (20,), generator=gen).tolist() for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        except Exception as e:  # noqa: BLE001 - the test reports any failure below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {0: expected, 1: expected}
