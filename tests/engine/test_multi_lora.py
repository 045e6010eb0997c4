"""Several LoRA adapters served over one base: in one batch each request gets its own adapter's output
(equal to an engine over that single adapter), the base rows nothing added; adapters salt the prefix
cache; the openai client picks an adapter by `model`; bad names are clear errors."""

import openai
import pytest
import torch

from effllm.core.errors import ConfigError, InputError
from effllm.engine import LLM, SamplingParams
from effllm.models.lora import LoRAConfig, apply_lora, lora_modules
from effllm.models.multi_lora import adapter_rows, load_adapters
from effllm.models.peft_adapter import load_adapter, save_adapter
from effllm.serve.app import build_app
from tests.engine.conftest import byte_model
from tests.serve.conftest import running_server

ADAPTERS = {
    "attn": LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
    "mlp": LoRAConfig(rank=2, alpha=4, targets=("down_proj", "o_proj"), rslora=True),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model = byte_model()
        apply_lora(model, config, seed=seed)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)
        dirs[name] = str(save_adapter(model, root / name, config))
    return dirs


def single(adapter_dir):
    model = byte_model()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model


def test_rows_get_their_own_adapter_in_one_forward(adapter_dirs):
    model = byte_model()
    names = load_adapters(model, adapter_dirs)
    assert names == ["attn", "mlp"]
    ids = torch.randint(0, 259, (3, 9), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(27).view(3, 9)
    with torch.no_grad(), adapter_rows(model, {0: rows[0], 1: rows[2]}):
        out = model(ids)
        expected = [
            single(adapter_dirs["attn"])(ids[:1]),
            single(None)(ids[1:2]),
            single(adapter_dirs["mlp"])(ids[2:]),
        ]
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], expected[i], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), single(None)(ids))  # outside the block: the base


def test_engine_batches_requests_of_different_adapters(adapter_dirs):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(32, 127, (n,), generator=gen).tolist() for n in (4, 19, 33, 7, 50, 12)]
    choice = [None, "attn", "mlp", "attn", None, "mlp"]
    lora = [f"{name}={path}" for name, path in adapter_dirs.items()]
    llm = LLM(byte_model(), lora=lora, max_num_batched_tokens=64, block_size=8)
    params = [SamplingParams(temperature=0, max_tokens=10, adapter=a) for a in choice]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    for prompt, adapter, out in zip(prompts, choice, outs, strict=True):
        reference = LLM(single(None if adapter is None else adapter_dirs[adapter]), block_size=8)
        expected = reference.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids, adapter
    assert llm.engine.runner.fused_decode is None


def test_adapters_do_not_share_prefix_cache_blocks(adapter_dirs):
    lora = [f"{name}={path}" for name, path in adapter_dirs.items()]
    llm = LLM(byte_model(), lora=lora, block_size=8)
    prompt = {"prompt_token_ids": list(range(40, 80))}
    first = llm.generate(prompt, SamplingParams(max_tokens=2, adapter="attn"), use_tqdm=False)[0]
    other = llm.generate(prompt, SamplingParams(max_tokens=2, adapter="mlp"), use_tqdm=False)[0]
    same = llm.generate(prompt, SamplingParams(max_tokens=2, adapter="attn"), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0 and same.num_cached_tokens == 32


def test_bad_adapter_names_are_clear_errors(adapter_dirs):
    with pytest.raises(ConfigError, match="NAME=PATH"):
        LLM(byte_model(), lora=["no-equals-sign"])
    with pytest.raises(ConfigError, match="twice"):
        LLM(byte_model(), lora=[f"a={adapter_dirs['attn']}", f"a={adapter_dirs['mlp']}"])
    llm = LLM(byte_model(), lora=[f"a={adapter_dirs['attn']}"])
    with pytest.raises(InputError, match="no LoRA adapter named 'b'; this engine has a"):
        llm.generate({"prompt_token_ids": [40]}, SamplingParams(adapter="b"), use_tqdm=False)
    with pytest.raises(ConfigError, match="already carries adapters"):
        load_adapters(single(adapter_dirs["attn"]), {"x": adapter_dirs["mlp"]})


def test_openai_client_picks_the_adapter_by_model_name(adapter_dirs, tmp_path):
    from effllm.engine.llm_engine import make_engine
    from effllm.models import save_model
    from effllm.models.tokenizer_training import build_byte_level_tokenizer

    folder = tmp_path / "base"
    tokenizer = build_byte_level_tokenizer(tmp_path / "tok")
    save_model(byte_model(), folder, tokenizer)
    lora = [f"{name}={path}" for name, path in adapter_dirs.items()]
    engine = make_engine(str(folder), lora=lora, device="cpu", max_model_len=256)
    app = build_app(engine, served_model_names="base")
    prompt = [40, 41, 42, 43, 44]
    with (
        running_server(app) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client,
    ):
        assert [m.id for m in client.models.list().data] == ["base", "attn", "mlp"]
        replies = {
            name: client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
            for name in ("base", "attn", "mlp")
        }
        assert {name: r.model for name, r in replies.items()} == {
            "base": "base",
            "attn": "attn",
            "mlp": "mlp",
        }
        texts = {name: r.choices[0].text for name, r in replies.items()}
        with pytest.raises(openai.BadRequestError, match="embeddings are the base model's"):
            client.embeddings.create(model="attn", input="hello")
    for name, adapter in (("base", None), ("attn", adapter_dirs["attn"]), ("mlp", adapter_dirs["mlp"])):
        reference = LLM(single(adapter), tokenizer).generate(
            {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
        )[0]
        assert texts[name] == reference.outputs[0].text, name
    assert len(set(texts.values())) == 3
    from effllm.cli import main

    args = ["generate", "--model", str(folder), "--lora", lora[0], "--max-tokens", "4", "hello"]
    assert main([*args, "--adapter", "attn"]) == 0
    assert main([*args, "--adapter", "nope"]) != 0
