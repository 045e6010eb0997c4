"""On CUDA: the Triton backend and CUDA-graph decoding give the CPU engine's greedy outputs."""

import copy

import pytest
import torch

from effllm.engine import LLM, SamplingParams
from effllm.engine.attention_backend import TritonPagedAttention
from effllm.engine.cuda_graphs import graph_batch_sizes


def prompts():
    gen = torch.Generator().manual_seed(0)
    return [
        {"prompt_token_ids": torch.randint(0, 128, (n,), generator=gen).tolist()}
        for n in (1, 9, 40, 130, 300)
    ]


@pytest.fixture(scope="module")
def cpu_outputs(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=20)
    return [
        o.token_ids
        for o in LLM(tiny_llama, max_num_batched_tokens=64).generate(prompts(), params, use_tqdm=False)
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_engine_matches_cpu_greedy_outputs(tiny_llama, cpu_outputs, enforce_eager):
    model = copy.deepcopy(tiny_llama).cuda()
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=8, enforce_eager=enforce_eager)
    runner = llm.engine.runner
    assert isinstance(runner.backend, TritonPagedAttention)
    assert (runner.graphs is None) == enforce_eager
    params = SamplingParams(temperature=0, max_tokens=20)
    assert [o.token_ids for o in llm.generate(prompts(), params, use_tqdm=False)] == cpu_outputs


@pytest.mark.cuda
def test_graph_replay_equals_eager_decode_hidden_states(tiny_llama):
    model = copy.deepcopy(tiny_llama).cuda()
    graphed = LLM(model, max_num_seqs=8).engine
    assert graphed.runner.graphs is not None
    for i, p in enumerate(prompts()[:3]):
        graphed.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=6))
    graphed.step()  # prefill (eager)
    out = graphed.scheduler.schedule()  # three decodes: replayed from the graph of batch size 4
    layout = graphed.runner.layout(out)
    hidden_graph = graphed.runner.forward(layout)
    # Recompute the same step eagerly: the keys written again at the same slots are identical.
    graphs, graphed.runner.graphs = graphed.runner.graphs, None
    hidden_eager = graphed.runner.forward(layout)
    graphed.runner.graphs = graphs
    torch.testing.assert_close(hidden_graph, hidden_eager, atol=1e-4, rtol=1e-4)


def test_graph_batch_sizes_cover_every_batch():
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(3) == [1, 2, 3]
