"""ms per decode step with and without the engine's fused q/k/v and gate/up (docs/benchmarks.md).

    python scripts/bench_fused_projections.py

Random SmolLM-135M weights, bf16 and W4A16 g32, batch 1 after a 512-token prompt, 64 greedy new tokens;
plain and fused alternate twice in one process so that both see the same machine.
"""

import time

import torch

import effllm.engine.model_runner as model_runner
from effllm.bench.shapes import shape_config
from effllm.compress import W4A16, quantize_
from effllm.engine.config import EngineConfig
from effllm.engine.llm_engine import LLMEngine
from effllm.engine.sampling_params import SamplingParams
from effllm.models import CausalLM
from effllm.models.fused_projections import fuse_projections


def ms_per_step(variant: str, fuse: bool) -> float:
    torch.manual_seed(0)
    model = CausalLM(shape_config("smollm-135m")).to(torch.bfloat16).eval()
    if variant == "w4a16":
        quantize_(model, W4A16(), show_progress=False)
    model_runner.fuse_projections = fuse_projections if fuse else (lambda m: 0)
    engine = LLMEngine(model, config=EngineConfig(enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=65, min_tokens=65, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": list(range(512))}, params)
    engine.step()
    engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    for variant in ("bf16", "w4a16"):
        for fuse in (False, True, False, True):
            print(f"{variant:6s} {'fused' if fuse else 'plain'}  {ms_per_step(variant, fuse):6.2f} ms/step")
    model_runner.fuse_projections = fuse_projections


if __name__ == "__main__":
    main()
