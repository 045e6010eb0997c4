"""`effllm train --method lora|qlora`: only the adapters train, the run writes a PEFT adapter (which peft
loads), QLoRA trains over a quantized base, and a killed run resumes exactly."""

from pathlib import Path

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.models import load_model
from effllm.models.lora import lora_modules
from effllm.models.peft_adapter import load_adapter, read_adapter_config
from effllm.models.quantized_linear import QuantizedLinear
from effllm.train import Trainer, train
from effllm.train.metrics import read_metrics

from .test_resume import assert_resumes_like


@pytest.fixture
def base(make_config, tmp_path):
    """A tiny model trained for a few steps: the base the adapters fine-tune."""
    config = make_config("base", steps=4)
    train(config)
    return config.out


def lora_run(make_config, base, name, **options):
    values = dict(
        model=base,
        model_config=None,
        method="lora",
        lora_rank=4,
        lora_targets=["q_proj,v_proj", "down_proj"],
        lr=1e-2,
        steps=6,
        save_every=2,
    )
    values.update(options)
    return make_config(name, **values)


def test_lora_trains_only_the_adapters_and_writes_a_peft_adapter(make_config, base):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    config = lora_run(make_config, base, "lora")
    trainer = Trainer(config)
    trainer.train()
    out = Path(config.out)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (out / "model.safetensors").exists()
    assert set(read_adapter_config(out).target_names()) == {"q_proj", "v_proj", "down_proj"}
    before = load_model(base, dtype=torch.float32, device="cpu").state_dict()
    trained = trainer.model.state_dict()
    for name, tensor in before.items():
        torch.testing.assert_close(trained[name], tensor, msg=name)  # the base is untouched
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(trainer.model).values())
    ours = load_model(base, dtype=torch.float32, device="cpu").eval()
    load_adapter(ours, out)
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), out
    ).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)
    losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl")]
    assert losses[-1] < losses[0]


def test_qlora_trains_adapters_over_a_quantized_base(make_config, base):
    config = lora_run(make_config, base, "qlora", method="qlora", lora_base_scheme="w8a16")
    trainer = Trainer(config)
    trainer.train()
    q_proj = trainer.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and q_proj.lora_A.dtype == torch.float32
    assert (Path(config.out) / "adapter_model.safetensors").exists()


def test_lora_resumes_exactly_after_a_kill(make_config, base):
    reference = lora_run(make_config, base, "reference")
    train(reference)
    extra = [
        "--model",
        base,
        "--method",
        "lora",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "down_proj",
    ]
    assert_resumes_like(reference, lora_run(make_config, base, "killed", keep_last=1), extra)


def test_lora_options_are_checked_up_front(make_config, base):
    with pytest.raises(ConfigError, match="add that method"):
        make_config("a", lora_base_scheme="w4a16").validate()
    with pytest.raises(ConfigError, match="rank"):
        lora_run(make_config, base, "b", lora_rank=0).validate()
    with pytest.raises(ConfigError, match="targets"):
        lora_run(make_config, base, "c", lora_targets=["lm_head"]).validate()
