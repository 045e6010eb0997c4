"""LoRA against `peft`: the same forward on the same weights, adapters that each side loads from the
other's files, merging equal to base plus adapter, and the engine running an adapted model as it is."""

import json

import pytest
import torch

from effllm.core.errors import CheckpointError, ConfigError
from effllm.models import load_model
from effllm.models.lora import LoRAConfig, apply_lora, is_lora, lora_modules, merge_lora
from effllm.models.peft_adapter import load_adapter, read_adapter_config, save_adapter
from tests.models.hf_fixtures import build_hf_model

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "base"
    build_hf_model("llama", 0).save_pretrained(folder)
    return folder


def ours(base):
    return load_model(base, dtype=torch.float32, device="cpu").eval()


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
        LoRAConfig(rank=8, alpha=16, targets=("all-linear",), rslora=True),
    ],
)
def test_our_adapter_equals_peft_on_the_same_weights_both_ways(base, tmp_path, config):
    from transformers import AutoModelForCausalLM

    model = ours(base)
    apply_lora(model, config)
    randomize(model)
    save_adapter(model, tmp_path / "ours", config, str(base))
    hf = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs(IDS).logits, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's own files into a fresh EffLLM model
    again = ours(base)
    assert read_adapter_config(tmp_path / "peft").rank == config.rank
    load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), theirs(IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_fresh_adapter_changes_nothing_and_trains_only_itself(base):
    model = ours(base)
    with torch.no_grad():
        before = model(IDS)
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B of two projections in two layers
    model(IDS).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_merging_equals_base_plus_adapter(base):
    model = ours(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=4, targets=("q_proj", "up_proj", "o_proj")))
    randomize(model, seed=1)
    with torch.no_grad():
        adapted = model(IDS)
        assert merge_lora(model) == 6
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-5, atol=1e-5)
    assert not lora_modules(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_merging_into_a_quantized_base_is_refused(base):
    from effllm.compress.schemes import W8A16, quantize_

    model = ours(base)
    quantize_(model, W8A16(), show_progress=False)
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="dense base"):
        merge_lora(model)


def test_the_engine_runs_the_adapted_model_without_fusing_its_projections(base):
    from effllm.engine import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = [[5, 6, 7, 8], [9, 10]]
    model = ours(base)
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj", "gate_proj")))
    randomize(model, seed=2)
    adapted = [o.token_ids for o in LLM(model).generate(prompts, params, use_tqdm=False)]
    assert all(is_lora(m) for m in lora_modules(model).values())
    merged = ours(base)
    apply_lora(merged, LoRAConfig(rank=4, targets=("q_proj", "v_proj", "gate_proj")))
    randomize(merged, seed=2)
    merge_lora(merged)
    assert adapted == [o.token_ids for o in LLM(merged).generate(prompts, params, use_tqdm=False)]


def test_bad_configs_and_adapters_are_refused(base, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(targets=("lm_head",))
    model = ours(base)
    apply_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=2))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        read_adapter_config(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter(ours(base), tmp_path / "a")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter_config(tmp_path / "nothing")
