"""ULD's logit difference: the combination against a transcription of the reference's greedy step, the
filter's exact mask, a zero assistant leaving the base's choices, and the engine (assistant on its own KV
cache, batched, with chunked prefill) equal to a full-recompute reference decode."""

import copy
import dataclasses
import math

import pytest
import torch

from effllm.core.errors import ConfigError, InputError
from effllm.engine import LLM, SamplingParams
from effllm.engine.logit_difference import logit_difference, relative_top_mask
from effllm.models import CausalLM, save_model
from effllm.train.unlearn import truncate
from tests.engine.conftest import byte_model


def reference_step(base, assistant, weight, relative_top):
    """ULD's greedy step (uld/model/gen_util.py), transcribed: weight is ULD's (negative) weight."""
    if relative_top > 0:
        normalized = base.log_softmax(dim=-1)
        min_tokens = int(relative_top * base.shape[-1])
        min_thresh = torch.sort(normalized, descending=True).values[..., min_tokens - 1]
        thresh = torch.min(min_thresh, normalized.max(dim=-1).values + math.log(relative_top)).unsqueeze(-1)
        mask = normalized < thresh
        assistant = assistant.clone()
        assistant[mask] = 0
        out = base + weight * assistant
        out[mask] = -1e3
        return out, mask
    return base.log_softmax(-1) + weight * assistant.log_softmax(-1), None


@pytest.mark.parametrize("relative_top", [0.1, 0.3, 0.0])
def test_combination_equals_the_reference(relative_top):
    g = torch.Generator().manual_seed(0)
    base, assistant = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 50, generator=g) * 3
    ours = logit_difference(base, assistant, weight=0.7, relative_top=relative_top)
    ref, mask = reference_step(base, assistant, -0.7, relative_top)
    if mask is None:
        torch.testing.assert_close(ours, ref)
        return
    assert torch.equal(relative_top_mask(base, relative_top), mask)
    assert torch.isinf(ours[mask]).all()
    torch.testing.assert_close(ours[~mask], ref[~mask])
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_a_zero_assistant_leaves_the_base_distribution():
    base = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    flat = logit_difference(base, torch.zeros_like(base), weight=2.0, relative_top=0.0)
    torch.testing.assert_close(flat.softmax(-1), base.softmax(-1))
    filtered = logit_difference(base, torch.zeros_like(base), weight=2.0, relative_top=0.1)
    keep = ~relative_top_mask(base, 0.1)
    torch.testing.assert_close(filtered[keep], base[keep])
    assert torch.equal(filtered.argmax(-1), base.argmax(-1))


def assistant_of(model, layers=1, seed=5):
    assistant = truncate(copy.deepcopy(model), layers)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in assistant.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        assistant.lm_head.weight.mul_(0.5)
    return assistant


def reference_decode(model, assistant, prompt, n, weight, relative_top):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            combined = logit_difference(model(x)[0, -1], assistant(x)[0, -1], weight, relative_top)
            ids.append(int(combined.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("relative_top", [0.1, 0.0])
def test_engine_decodes_as_the_full_recompute_reference(tmp_path, relative_top):
    model = byte_model()
    assistant = assistant_of(model)
    save_model(assistant, tmp_path / "assistant")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(32, 127, (n,), generator=gen).tolist() for n in (3, 30, 70)]
    llm = LLM(
        copy.deepcopy(model),
        uld_assistant=str(tmp_path / "assistant"),
        uld_weight=1.5,
        uld_filter=relative_top,
        block_size=8,
        max_num_batched_tokens=48,  # the 70-token prompt prefills in chunks
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10)
    )
    expected = [reference_decode(model, assistant, p, 10, 1.5, relative_top) for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == expected
    plain = LLM(copy.deepcopy(model)).generate(
        {"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=10)
    )
    assert plain[0].outputs[0].token_ids != expected[1]  # the assistant changes what is generated
    llm.engine.step()  # nothing runs: the assistant's state and blocks go
    side = llm.engine.uld.side
    assert not side.states and len(side.free) == side.cache.num_blocks


def test_a_zero_assistant_keeps_greedy_output(tmp_path):
    model = byte_model()
    assistant = assistant_of(model)
    with torch.no_grad():
        assistant.lm_head.weight.zero_()
    save_model(assistant, tmp_path / "zero")
    prompts = [{"prompt_token_ids": [40 + i] * (5 + 7 * i)} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12)
    uld = LLM(copy.deepcopy(model), uld_assistant=str(tmp_path / "zero")).generate(prompts, params)
    plain = LLM(copy.deepcopy(model)).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in uld] == [o.outputs[0].token_ids for o in plain]


def test_what_uld_cannot_serve_is_refused(tmp_path):
    model = byte_model()
    save_model(assistant_of(model), tmp_path / "a")
    with pytest.raises(ConfigError, match="speculative"):
        LLM(copy.deepcopy(model), uld_assistant=str(tmp_path / "a"), speculative_method="ngram")
    with pytest.raises(ConfigError, match="uld-filter"):
        LLM(copy.deepcopy(model), uld_assistant=str(tmp_path / "a"), uld_filter=1.5)
    llm = LLM(copy.deepcopy(model), uld_assistant=str(tmp_path / "a"))
    with pytest.raises(InputError, match="prompt_logprobs"):
        llm.generate({"prompt_token_ids": [40, 41]}, SamplingParams(prompt_logprobs=1))
    other = CausalLM(dataclasses.replace(model.config, vocab_size=300))
    save_model(truncate(other, 1), tmp_path / "b")
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(copy.deepcopy(model), uld_assistant=str(tmp_path / "b"))
