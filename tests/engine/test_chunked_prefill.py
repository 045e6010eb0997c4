"""A prompt prefilled in chunks through the paged cache gives the logits of a single-shot prefill."""

import pytest
import torch

from effllm.engine.attention_backend import PagedAttention
from effllm.engine.block_manager import BlockManager
from effllm.engine.config import EngineConfig
from effllm.engine.model_runner import ModelRunner
from effllm.engine.request import Request
from effllm.engine.sampling_params import SamplingParams
from effllm.engine.scheduler import SchedulerOutput
from tests.engine.conftest import hf_and_effllm


@pytest.fixture(scope="module", params=["llama", "mistral-sliding"])
def model(request, tmp_path_factory):
    return hf_and_effllm(request.param, tmp_path_factory.mktemp(request.param))[1]


def chunked_logits(model, prompt: list[int], chunk: int, compiled: bool = True) -> torch.Tensor:
    """Logits [len(prompt), vocab] of every prompt position, computed `chunk` tokens per step."""
    config = EngineConfig(num_kv_blocks=64, max_num_seqs=1, max_num_batched_tokens=max(chunk, 1))
    runner = ModelRunner(model, config.resolve(model.config.max_position_embeddings, model.device))
    runner.backend = PagedAttention(runner.cache, use_compiled=compiled)
    blocks = BlockManager(runner.num_blocks, config.block_size)
    request = Request("r", prompt, SamplingParams())
    logits = []
    while request.num_computed_tokens < len(prompt):
        n = min(chunk, len(prompt) - request.num_computed_tokens)
        assert blocks.allocate(request, n)
        hidden = runner.forward(runner.layout(SchedulerOutput([request], [n])))
        with torch.inference_mode():
            logits.append(model.logits(hidden))
        request.num_computed_tokens += n
    return torch.cat(logits)


# Chunks of one token are single-token queries: the decode kernels (compiled and PyTorch) serve them.
@pytest.mark.parametrize(("chunk", "compiled"), [(1, True), (1, False), (7, True), (64, True)])
def test_chunked_prefill_matches_single_shot_prefill(model, chunk, compiled):
    prompt = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        single_shot = model(torch.tensor([prompt]))[0]
    torch.testing.assert_close(chunked_logits(model, prompt, chunk, compiled), single_shot, atol=1e-4, rtol=0)
