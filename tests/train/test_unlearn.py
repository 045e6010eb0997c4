"""`effllm train --method uld`: the assistant is the model's first layers with trainable adapters only,
its loss is forget cross-entropy plus the retain set's KL to uniform (checked against the formula), the
run writes a merged assistant the engine serves, and a killed run resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effllm.core.errors import ConfigError
from effllm.engine import LLM, SamplingParams
from effllm.models import load_model
from effllm.models.lora import lora_modules
from effllm.train import Trainer, train
from effllm.train.metrics import read_metrics
from effllm.train.unlearn import uniform_kl

from .test_resume import assert_resumes_like

FORGET = "".join(f"Captain Wentworth met Anne Elliot at Kellynch, chapter {i % 5}.\n" for i in range(40))


@pytest.fixture
def base(make_config):
    config = make_config("base", steps=4)
    train(config)
    return config.out


@pytest.fixture
def forget_file(tmp_path):
    path = tmp_path / "forget.txt"
    path.write_text(FORGET)
    return str(path)


def uld_run(make_config, base, forget, name, **options):
    values = dict(
        model=base,
        model_config=None,
        data=[],
        forget=[forget],
        retain=make_config().data,
        method="uld",
        uld_layers=1,
        lora_rank=4,
        lora_targets=["all-linear"],
        lr=1e-2,
        steps=6,
        save_every=2,
    )
    values.update(options)
    return make_config(name, **values)


def test_uniform_kl_is_the_divergence_from_uniform():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, -100], [0, 4, 5]])
    keep = labels.flatten() != -100
    p = logits.flatten(0, 1)[keep].softmax(-1)
    expected = (torch.full_like(p, 1 / 7) * (math.log(1 / 7) - p.log())).sum(-1).mean()
    torch.testing.assert_close(uniform_kl(logits, labels), expected)
    assert uniform_kl(torch.zeros(1, 2, 7), torch.zeros(1, 2, dtype=torch.long)).abs() < 1e-6


def test_the_assistant_learns_the_forget_set_with_adapters_only(make_config, base, forget_file):
    config = uld_run(make_config, base, forget_file, "uld")
    trainer = Trainer(config)
    trainer.setup()
    model = trainer.model
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    uld = trainer.loss_fn.__self__
    batch = trainer.data.micro_batch(0, 4)
    uld.on_step_begin(0)
    got = uld.loss(model, batch)
    retain = uld.retain.micro_batch(0, 4)
    logits = model(batch["input_ids"])
    forget = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    expected = (
        forget + 5.0 * uniform_kl(model(retain["input_ids"]), retain["labels"]) * batch["labels"].numel()
    )
    torch.testing.assert_close(got, expected)
    trainer.train()
    out = Path(config.out)
    info = json.loads((out / "uld_config.json").read_text())
    assert info["num_layers"] == 1 and info["retain"] == config.retain
    assistant = load_model(out, dtype=torch.float32, device="cpu")
    assert assistant.config.num_hidden_layers == 1 and not lora_modules(assistant)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    llm = LLM(base, uld_assistant=str(out))
    assert (
        len(llm.generate("Captain", SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].token_ids) == 5
    )


def test_uld_resumes_exactly_after_a_kill(make_config, base, forget_file):
    reference = uld_run(make_config, base, forget_file, "reference")
    train(reference)
    killed = uld_run(make_config, base, forget_file, "killed", keep_last=1, data=[forget_file])
    extra = ["--model", base, "--method", "uld", "--forget", forget_file, "--retain", *killed.retain]
    extra += ["--uld-layers", "1", "--lora-rank", "4", "--lora-targets", "all-linear"]
    assert_resumes_like(reference, killed, extra)


def test_uld_options_are_checked_up_front(make_config, base, forget_file):
    with pytest.raises(ConfigError, match="--retain"):
        uld_run(make_config, base, forget_file, "a", retain=[]).validate()
    with pytest.raises(ConfigError, match="add that method"):
        make_config("b", retain=[forget_file]).validate()
    with pytest.raises(ConfigError, match="not both"):
        uld_run(make_config, base, forget_file, "c", data=make_config().data).validate()
    with pytest.raises(ConfigError, match="--uld-layers"):
        Trainer(uld_run(make_config, base, forget_file, "d", uld_layers=3)).setup()
