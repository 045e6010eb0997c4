"""Sampling: seeds reproduce whatever the batch, filters behave at their limits, stop strings cut exactly."""

import pytest
import torch

from effllm.core.errors import InputError
from effllm.engine import LLM, SamplingParams
from effllm.models.tokenizer_training import build_byte_level_tokenizer
from tests.engine.conftest import byte_model


def random_prompts(n, seed=0, low=3, high=60):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen).tolist()
    return [{"prompt_token_ids": torch.randint(0, 128, (k,), generator=gen).tolist()} for k in lengths]


def test_seeded_sampling_reproduces_across_batch_compositions(tiny_llama):
    target = random_prompts(1, seed=1)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20)
    alone = LLM(tiny_llama).generate(target, params, use_tqdm=False)[0].token_ids
    others = random_prompts(7, seed=2)
    mixed_params = [
        SamplingParams(temperature=1.3, max_tokens=25),
        SamplingParams(temperature=0, max_tokens=5),
    ] * 4
    batch = others[:3] + [target] + others[3:]
    outs = LLM(tiny_llama, max_num_batched_tokens=40).generate(
        batch, mixed_params[:3] + [params] + mixed_params[3:7], use_tqdm=False
    )
    assert outs[3].token_ids == alone
    unseeded = LLM(tiny_llama, seed=99).generate(
        target, SamplingParams(temperature=0.9, max_tokens=20), use_tqdm=False
    )[0]
    assert unseeded.token_ids != alone  # the seed, not the prompt, fixes the samples


def test_top_k_1_equals_greedy(tiny_llama):
    prompts = random_prompts(6, seed=3)
    llm = LLM(tiny_llama)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=16), use_tqdm=False)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_tiny_top_p_and_min_p_equal_greedy(tiny_llama):
    prompts = random_prompts(4, seed=4)
    llm = LLM(tiny_llama)
    greedy = [
        o.token_ids
        for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    ]
    for params in (
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12),
        SamplingParams(temperature=1.0, min_p=0.999999, max_tokens=12),
    ):
        assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == greedy


def test_logprobs_are_those_of_the_model(tiny_llama):
    prompt = random_prompts(1, seed=5)[0]
    out = LLM(tiny_llama).generate(
        prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False
    )[0]
    ids = prompt["prompt_token_ids"] + out.token_ids
    with torch.no_grad():
        logp = tiny_llama(torch.tensor([ids]))[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = logp[len(prompt["prompt_token_ids"]) - 1 + i]
        top = row.topk(3).indices.tolist()
        assert list(entry) == top  # greedy: the sampled token is the most likely, so 3 entries
        assert entry[token] == pytest.approx(float(row[token]), abs=1e-4)


def test_penalties_change_what_is_repeated(tiny_llama):
    prompt = random_prompts(1, seed=6)[0]
    llm = LLM(tiny_llama)
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].token_ids
    penalised = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0),
        use_tqdm=False,
    )[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_min_tokens_holds_back_end_tokens(tiny_llama):
    prompt = random_prompts(1, seed=7)[0]
    llm = LLM(tiny_llama)
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].token_ids
    stop = greedy[2]
    first = greedy.index(stop)
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]), use_tqdm=False
    )[0]
    assert (
        out.token_ids == greedy[: first + 1]
        and out.finish_reason == "stop"
        and out.outputs[0].stop_reason == stop
    )
    held = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 2, stop_token_ids=[stop]),
        use_tqdm=False,
    )[0]
    assert len(held.token_ids) >= first + 2 and stop not in held.token_ids[: first + 2]


@pytest.fixture(scope="module")
def byte_llm():
    return LLM(byte_model(), tokenizer=build_byte_level_tokenizer())


def test_stop_strings_cut_exactly_where_they_begin(byte_llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    full = byte_llm.generate("Once upon a time", params, use_tqdm=False)[0].text
    assert len(full) == 40 and full.isascii()
    stop = full[17:20]
    cut = full.index(stop)
    out = byte_llm.generate(
        "Once upon a time",
        SamplingParams(temperature=0, max_tokens=40, stop=[stop, "never!"]),
        use_tqdm=False,
    )[0]
    assert out.text == full[:cut]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    kept = byte_llm.generate(
        "Once upon a time",
        SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert kept.text == full[: cut + len(stop)]


def test_streamed_deltas_add_up_and_never_show_a_stop_string(byte_llm):
    engine = byte_llm.engine
    full = byte_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].text
    stop = full[12:15]
    engine.add_request("s", "Hello", SamplingParams(temperature=0, max_tokens=30, stop=stop))
    streamed, tokens = "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
            assert stop not in streamed
    assert streamed == out.text == full[: full.index(stop)]
    assert tokens == out.token_ids


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=1.5),
        dict(n=0),
        dict(max_tokens=0),
        dict(min_tokens=5, max_tokens=2),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(frequency_penalty=-2.5),
        dict(stop=[""]),
        dict(stop_token_ids=[-1]),
        dict(logprobs=-1),
    ],
)
def test_invalid_sampling_params_raise_at_construction(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)


def test_inverse_cdf_draws_follow_the_distribution_and_never_draw_impossible_tokens():
    from effllm.engine.sampler import draw_from

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    drawn = draw_from(probs.repeat_interleave(n, dim=0), torch.rand(2 * n, generator=gen)).view(2, n)
    counts = torch.stack([torch.bincount(row, minlength=5) for row in drawn]).float() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts - probs).abs() <= 4 * sigma + 1e-9).all(), counts
    assert counts[0, 1] == counts[0, 4] == 0 and (drawn[1] == 3).all()
    edge = draw_from(probs[:1], torch.tensor([1 - 1e-7]))  # u at the top never runs past the vocabulary
    assert edge.item() == 3


def test_greedy_tokens_is_argmax_with_its_ties_and_nans():
    from effllm.engine.sampler import greedy_tokens

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=gen).round()  # many ties per row
    logits[3, 10] = float("nan")
    logits[5] = 0.0  # a row that is all ties
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(greedy_tokens(logits.to(dtype)), logits.to(dtype).argmax(dim=-1))
