"""The embedded default model: shipped in Hugging Face layout, loadable by transformers with our logits."""

import pytest
import torch

from effllm.models import load_model, load_tokenizer
from effllm.models.default import DEFAULT_MODEL_DIR, default_model_path


def test_default_model_ships_in_bf16_with_its_tokenizer():
    folder = default_model_path()
    model = load_model(folder, device="cpu")
    assert model.dtype == torch.bfloat16 and 10e6 < sum(p.numel() for p in model.parameters()) < 20e6
    tok = load_tokenizer(folder)
    assert tok.vocab_size == model.config.vocab_size
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True
    )


def test_transformers_loads_the_default_model_with_the_same_logits():
    transformers = pytest.importorskip("transformers")
    ours = load_model(DEFAULT_MODEL_DIR, dtype="float32", device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor(
        [load_tokenizer(DEFAULT_MODEL_DIR).encode("It is a truth universally acknowledged, that")]
    )
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_the_eval_commands_reproduce_the_model_cards_figures(capsys):
    """docs/default-model.md quotes eval_results.json; `effllm eval perplexity|cloze --json` must reproduce it."""
    import json

    from effllm.cli import main

    card = json.loads((DEFAULT_MODEL_DIR / "eval_results.json").read_text())
    assert main(["eval", "perplexity", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out)
    assert ppl["word_perplexity"] == pytest.approx(card["persuasion_word_perplexity"], rel=2e-3)
    assert ppl["token_perplexity"] == pytest.approx(card["persuasion_token_perplexity"], rel=2e-3)
    assert main(["eval", "cloze", "--json"]) == 0
    cloze = json.loads(capsys.readouterr().out)
    assert cloze["acc"] == pytest.approx(card["cloze_acc"], abs=0.004)
