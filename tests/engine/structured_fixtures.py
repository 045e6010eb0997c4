"""A tiny random model over the default model's tokenizer, with padding rows past the tokenizer's
vocabulary (as checkpoints that round their embedding up have), saved where transformers can load it."""

from __future__ import annotations

import torch

from effllm.models import CausalLM, ModelConfig, load_tokenizer, save_model
from effllm.models.default import default_model_path

PADDING = 40  # model vocabulary = tokenizer's + PADDING ids that no text maps to


def tiny_model_folder(folder, seed: int = 0):
    tokenizer = load_tokenizer(default_model_path())
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size + PADDING,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = CausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked distributions, so samples are not uniform noise
        # The padding ids would win every argmax if nothing masked them: their rows are +-50 * (1, ..., 1),
        # so one of the two signs scores 50 |sum(h)| whatever the final hidden state h.
        sign = torch.tensor([1.0, -1.0]).repeat(PADDING // 2)[:, None]
        model.lm_head.weight[-PADDING:] = sign * 50
    save_model(model, folder, tokenizer=tokenizer)
    return folder, tokenizer
