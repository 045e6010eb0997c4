"""`effllm train --method soft-prompt`: only the prompt trains (the pruned base is untouched), its held-out
loss falls, the run writes the prompt alone, `effllm eval perplexity --soft-prompt` scores with it, and a
killed run resumes exactly."""

import json
from pathlib import Path

import pytest
import torch

from effllm.cli import main
from effllm.compress.prune import prune_
from effllm.core.errors import ConfigError
from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.soft_prompt import add_soft_prompt, load_soft_prompt, save_soft_prompt
from effllm.train import Trainer, train
from effllm.train.metrics import read_metrics

from .test_resume import assert_resumes_like


@pytest.fixture
def pruned(make_config, tmp_path):
    """A tiny model trained for a few steps, then half its decoder weights removed by magnitude."""
    config = make_config("base", steps=6)
    train(config)
    model = load_model(config.out, dtype=torch.float32, device="cpu")
    prune_(model, "magnitude", 0.5, progress=False)
    return str(save_model(model, tmp_path / "pruned", load_tokenizer(config.out)))


def prompt_run(make_config, base, name, **options):
    values = dict(
        model=base,
        model_config=None,
        method="soft-prompt",
        soft_prompt_tokens=4,
        lr=5e-2,
        steps=6,
        save_every=2,
        eval_every=1,
    )
    values.update(options)
    return make_config(name, **values)


def test_only_the_prompt_trains_and_the_held_out_loss_falls(make_config, pruned, capsys):
    config = prompt_run(make_config, pruned, "prompt")
    trainer = Trainer(config)
    trainer.train()
    out = Path(config.out)
    assert not (out / "model.safetensors").exists()
    prompt, saved = load_soft_prompt(out)
    assert prompt.shape == (4, trainer.model.config.hidden_size) and saved["base_model"] == pruned
    base = load_model(pruned, dtype=torch.float32, device="cpu")
    initial = base.model.embed_tokens.weight[:4]
    assert not torch.allclose(prompt, initial)
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(
            trainer.model.state_dict()[name], tensor, msg=name
        )  # the base is untouched
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    add_soft_prompt(base, initial)
    save_soft_prompt(base, out.parent / "untrained")
    capsys.readouterr()
    args = ["eval", "perplexity", config.data[0], "--model", pruned, "--max-length", "32", "--json"]
    code = main([*args, "--soft-prompt", str(out.parent / "untrained")])
    untrained = json.loads(capsys.readouterr().out)["token_perplexity"]
    code += main([*args, "--soft-prompt", str(out)])
    trained = json.loads(capsys.readouterr().out)["token_perplexity"]
    assert (
        code == 0 and trained != untrained
    )  # the prompt is applied (what six steps buy is measured in docs)
    too_long = ["--soft-prompt", str(out), "--max-length", "62"]  # 64 positions less the prompt's 4 leave 60
    assert main(["eval", "perplexity", config.data[0], "--model", pruned, *too_long]) != 0
    assert "exceeds the model's context of 60 tokens" in capsys.readouterr().err


def test_soft_prompt_resumes_exactly_after_a_kill(make_config, pruned):
    reference = prompt_run(make_config, pruned, "reference", eval_every=0)
    train(reference)
    killed = prompt_run(make_config, pruned, "killed", eval_every=0, keep_last=1)
    extra = ["--model", pruned, "--method", "soft-prompt", "--soft-prompt-tokens", "4"]
    assert_resumes_like(reference, killed, extra)


def test_a_prompt_that_does_not_fit_the_context_is_refused(make_config, pruned):
    with pytest.raises(ConfigError, match="soft-prompt tokens exceeds"):
        Trainer(prompt_run(make_config, pruned, "long", soft_prompt_tokens=500, seq_len=32)).setup()
