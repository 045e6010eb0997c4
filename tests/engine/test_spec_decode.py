"""Speculative decoding: n-gram prompt lookup, greedy exactness in mixed batches, and rejection sampling's
distribution (a chi-square test), with vLLM's greedy rejection-sampler cases as vectors."""

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.engine.config import EngineConfig
from effllm.engine.spec_decode.ngram import NgramProposer, lookup
from effllm.engine.spec_decode.proposer import Proposer
from effllm.engine.spec_decode.rejection import rejection_sample
from effllm.engine.spec_decode.verify import accept_greedy
from effllm.models import CausalLM, ModelConfig
from effllm.models.checkpoint import save_model


def test_lookup_takes_the_longest_recent_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 1, 4) == [7, 1]  # latest earlier "1 2 3" is at 4
    assert lookup([5, 6, 5, 6, 5], 4, 1, 4) == [6, 5]  # "5 6 5" at 0, followed by 6 5
    assert lookup([1, 2, 3, 4], 3, 1, 4) == []  # nothing repeats
    assert lookup([4, 8, 1, 4], 3, 2, 4) == []  # only a 1-token match, below min_n
    assert lookup([4, 8, 1, 4], 3, 1, 4) == [8, 1, 4]
    with pytest.raises(ValueError):
        NgramProposer(k=0)


# vLLM's greedy rejection-sampler cases (tests/v1/sample/test_rejection_sampler.py), as (drafts, target
# argmax at each draft position and the bonus position, expected output).
VLLM_GREEDY_CASES = [
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),  # perfect match: all drafts and the bonus
    ([1, 2, 3], [1, 5, 3, 4], [1, 5]),  # early mismatch
    ([1, 2], [1, 2, 5], [1, 2, 5]),
    ([], [7], [7]),  # no drafts
    ([1, 2, 3], [4, 5, 6, 7], [4]),  # first draft rejected
]


@pytest.mark.parametrize("drafts, target, expected", VLLM_GREEDY_CASES)
def test_greedy_acceptance_matches_vllm_cases(drafts, target, expected):
    assert [t for t, _ in accept_greedy(drafts, [(t, None) for t in target])] == expected


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    keep = probs * n >= 5  # bins with enough expected counts; the rest pooled
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    expected = torch.cat([probs[keep], probs[~keep].sum()[None]]).double() * n
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(expected) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))  # the chi-square survival function


@pytest.mark.parametrize("one_hot", [True, False])
def test_rejection_sampling_reproduces_the_target_distribution(one_hot):
    """Each emitted position is distributed as the target's p, whatever the drafts' distribution q."""
    gen = torch.Generator().manual_seed(0)
    vocab, k, n = 6, 2, 20000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen), -1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 2, -1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    lengths = []
    for _ in range(n):
        if one_hot:
            drafts = [2, 4]  # a fixed proposal, as n-gram lookup makes
            out = rejection_sample(p, drafts, torch.rand(k + 1, generator=gen))
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
            out = rejection_sample(p, drafts, torch.rand(k + 1, generator=gen), q)
        first[out[0]] += 1
        if len(out) > 1 and out[0] == drafts[0]:  # position 2 given that draft 1 was accepted
            second[out[1]] += 1
        lengths.append(len(out))
    assert _chi_square_p(first, p[0]) > 1e-3
    # Given an accepted first draft, the next token is again distributed as the target's p[1].
    assert _chi_square_p(second, p[1]) > 1e-3
    # The first draft is accepted with probability p(x) (one-hot) or sum_x min(p, q) (Leviathan et al.).
    expected_accept = p[0, 2] if one_hot else torch.minimum(p[0], q[0]).sum()
    assert abs(second.sum() / n - expected_accept) < 0.02


def repetitive_prompts(n=16, seed=0):
    """Prompts that repeat a short phrase (so lookup finds drafts), with random ones mixed in."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        phrase = torch.randint(
            0, 128, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen
        ).tolist()
        prompt = phrase * int(torch.randint(2, 8, (1,), generator=gen))
        if i % 4 == 3:
            prompt = torch.randint(0, 128, (20,), generator=gen).tolist()
        out.append(prompt)
    return out


@pytest.mark.parametrize("options", [{}, {"num_kv_blocks": 10, "max_num_batched_tokens": 40}])
def test_ngram_greedy_output_equals_plain_greedy_on_a_mixed_batch(tiny_llama, options):
    prompts = repetitive_prompts()
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.token_ids for o in LLM(tiny_llama, **options).generate(prompts, params, use_tqdm=False)]
    llm = LLM(
        tiny_llama,
        speculative_method="ngram",
        num_speculative_tokens=3,
        speculative_max_running=64,
        speculative_adaptive=False,
        **options,
    )
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0 and stats.num_verifications > 0 and stats.mean_accepted_length >= 1
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    if options:
        assert stats.num_preemptions > 0


class GreedyGuess(Proposer):
    """Drafts the target's own argmax continuation (a deterministic proposer, q one-hot), so that sampled
    requests see drafts accepted often and rejected often."""

    def __init__(self, model):
        self.model = model

    def propose(self, requests, limits):
        with torch.no_grad():
            return [[int(self.model(torch.tensor([r.token_ids]))[0, -1].argmax())] for r in requests]


@pytest.mark.parametrize("method", ["guess", "early-exit"])
def test_sampled_output_with_drafts_keeps_the_models_distribution(tiny_llama, method):
    """The second output token (the first one drafted) over many seeds against the exact marginal."""
    prompt = [5, 6, 7] * 5
    params = [SamplingParams(temperature=1.0, top_k=6, max_tokens=3, seed=s) for s in range(1500)]
    if method == "guess":
        llm = LLM(tiny_llama, speculative_max_running=4096, speculative_adaptive=False)
        llm.engine.proposer = GreedyGuess(tiny_llama)
    else:
        llm = LLM(
            tiny_llama,
            speculative_method=method,
            speculative_exit_layer=1,
            speculative_max_running=4096,
            speculative_adaptive=False,
        )
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    counts = torch.zeros(128)
    for o in outs:
        counts[o.token_ids[1]] += 1

    # Exact marginal of token 2: sum over token 1 of p(t1) p(t2 | t1), both after temperature and top-k.
    def dist(ids):
        with torch.no_grad():
            logits = tiny_llama(torch.tensor([ids]))[0, -1]
        top = logits.topk(6)
        return torch.zeros(128).scatter_(0, top.indices, torch.softmax(top.values, -1))

    p1 = dist(prompt)
    marginal = sum(p1[t] * dist(prompt + [t]) for t in p1.nonzero()[:, 0].tolist())
    assert _chi_square_p(counts, marginal) > 1e-3


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch(tiny_llama):
    prompt = [5, 6, 7] * 5
    seeded = SamplingParams(temperature=0.9, max_tokens=12, seed=7)
    others = [SamplingParams(temperature=0.9, max_tokens=12) for _ in range(5)]

    def run(batch_params):
        llm = LLM(tiny_llama, speculative_max_running=64, speculative_adaptive=False)
        llm.engine.proposer = GreedyGuess(tiny_llama)
        return llm.generate([prompt] * len(batch_params), batch_params, use_tqdm=False)[0].token_ids

    assert run([seeded]) == run([seeded, *others])


def test_speculative_options_are_checked(tiny_llama):
    with pytest.raises(ConfigError, match="choose one of ngram"):
        EngineConfig(speculative_method="eagle")
    with pytest.raises(ConfigError, match="needs --speculative-model"):
        EngineConfig(speculative_method="draft")
    with pytest.raises(ConfigError, match="for --speculative-method early-exit"):
        EngineConfig(speculative_exit_layer=2)
    with pytest.raises(ConfigError, match="do not combine"):
        EngineConfig(skip_decode="1,2", speculative_method="ngram")
    with pytest.raises(ConfigError, match="between 1 and the model's 2 layers"):
        LLM(tiny_llama, speculative_method="early-exit", speculative_exit_layer=3)
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        EngineConfig(prompt_lookup_min=3, prompt_lookup_max=2)


@pytest.mark.parametrize("exit_layer", [1, 2])
@pytest.mark.parametrize("options", [{}, {"num_kv_blocks": 10, "max_num_batched_tokens": 40}])
def test_early_exit_greedy_output_equals_plain_greedy(tiny_llama, exit_layer, options):
    """Self-speculation verifies from the drafts' layer-E hidden states; the output must not change, and at
    E = the model's depth the drafts are the model's own tokens, so every one is accepted."""
    prompts = repetitive_prompts()
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.token_ids for o in LLM(tiny_llama, **options).generate(prompts, params, use_tqdm=False)]
    llm = LLM(
        tiny_llama,
        speculative_method="early-exit",
        speculative_exit_layer=exit_layer,
        speculative_max_running=64,
        speculative_adaptive=False,
        **options,
    )
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0
    if exit_layer == 2:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    if options:
        assert stats.num_preemptions > 0


def small_draft(vocab=128, seed=1):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    return CausalLM(config).eval()


@pytest.mark.parametrize("draft", ["small", "target"])
@pytest.mark.parametrize("options", [{}, {"num_kv_blocks": 10, "max_num_batched_tokens": 40}])
def test_draft_model_greedy_output_equals_plain_greedy(tiny_llama, tmp_path, draft, options):
    prompts = repetitive_prompts()
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.token_ids for o in LLM(tiny_llama, **options).generate(prompts, params, use_tqdm=False)]
    save_model(small_draft() if draft == "small" else tiny_llama, tmp_path / "draft")
    llm = LLM(
        tiny_llama,
        speculative_method="draft",
        speculative_model=str(tmp_path / "draft"),
        speculative_max_running=64,
        speculative_adaptive=False,
        **options,
    )
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    stats, proposer = llm.engine.stats, llm.engine.proposer
    assert stats.num_draft_tokens > 0
    if draft == "target":  # the draft is the target: it agrees with every greedy token
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    llm.engine.step()  # no request runs: the draft model's state and blocks go
    assert not proposer.states and len(proposer.free) == proposer.cache.num_blocks


def test_draft_model_must_share_the_vocabulary(tiny_llama, tmp_path):
    save_model(small_draft(vocab=96), tmp_path / "draft")
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(tiny_llama, speculative_method="draft", speculative_model=str(tmp_path / "draft"))


def test_usage_counts_accepted_drafts(tiny_llama):
    llm = LLM(
        tiny_llama, speculative_method="early-exit", speculative_exit_layer=2, speculative_adaptive=False
    )
    out = llm.generate([[5, 6, 7] * 4], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert out.num_draft_tokens > 0 and out.num_accepted_tokens == out.num_draft_tokens
